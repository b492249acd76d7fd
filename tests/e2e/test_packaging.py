"""Installed names: probes/ and experiments/ install as vlm_lens.probes and vlm_lens.experiments, so a research
folder with its own experiments/ package or probes.py cannot shadow them; and the version is one number."""

import os
import subprocess
import sys

from vlm_lens import testing

TRAP = "raise ImportError('the user\\'s own {name} was imported instead of vlm-lens')\n"


def research_folder(tmp_path):
    (tmp_path / "experiments").mkdir(parents=True)
    (tmp_path / "experiments" / "__init__.py").write_text(TRAP.format(name="experiments/"))
    (tmp_path / "probes.py").write_text(TRAP.format(name="probes.py"))
    return tmp_path


def run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_a_users_experiments_folder_and_probes_py_do_not_shadow_ours(tmp_path):
    folder = research_folder(tmp_path / "research")
    api = run(["-c", "from vlm_lens.experiments.analysis import knowledge_evolution as ke; from vlm_lens.probes import "
                     "LogitLensProbe; import vlm_lens.experiments, vlm_lens.probes, pathlib; "
                     "print(pathlib.Path(vlm_lens.probes.__file__).parent.name, ke.EvolutionConfig().variants)"], folder)  # fmt: skip
    assert api.returncode == 0, api.stderr
    assert "probes ('correct', 'paper')" in api.stdout
    testing.save("llava", tmp_path / "model")
    testing.sample_image(1, 32).save(folder / "img.png")
    cli = run(["-m", "vlm_lens.experiments.cli", "analyze", "--model", str(tmp_path / "model"), "--image", "img.png",
               "--prompt", "what color ?", "--max-new-tokens", "2", "--out", "report", "--no-png"], folder)  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert (folder / "report" / "report.json").exists()
    # and the user's own modules are still theirs to import
    own = run(["-c", "import probes"], folder)
    assert "the user's own probes.py" in own.stderr


def test_version_is_the_distribution_version():
    from importlib.metadata import version

    import vlm_lens

    assert vlm_lens.__version__ == version("vlm-lens")
