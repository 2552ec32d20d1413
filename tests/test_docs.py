"""The README stays true: its plugin example runs, its test command is the one CI runs."""
import re
import types

from metabench.runner import RunRequest, execute

from conftest import ROOT, host_with, tiny_plugin

README = (ROOT / "README.md").read_text()


def test_readme_plugin_example_runs():
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "metabench_register_learners" in b]
    module = types.ModuleType("readme_plugin")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    host = host_with(("readme", module), ("tiny", tiny_plugin()))
    assert host.errors == []
    doc = execute(RunRequest(learner="tiny_proto", task="tiny-3w2s", budget="smoke"), host)
    assert doc["learner"]["resumable"] is True  # it trained through ctx.steps / ctx.step
    assert doc["summary"]["mean"] > 0.5  # 3 ways: chance is 1/3


def test_readme_test_command_is_what_ci_runs():
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    test_cmd = next(b for b in blocks if "pytest" in b).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    for step in test_cmd.split(" && ")[2:]:  # after creating and activating the venv
        assert step in ci, step
    assert "python3 -m venv" in ci


def test_readme_names_every_hook():
    import inspect

    from metabench import hookspecs

    for name in (n for n in dir(hookspecs) if n.startswith("metabench_")):
        signature = f"{name}({', '.join(inspect.signature(getattr(hookspecs, name)).parameters)})"
        assert signature in README, signature
