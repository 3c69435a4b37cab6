"""launch/*.sh: syntax, the commands they print (--dry-run) and run, and their usage errors.

The real runs go to stand-ins for `python`, `sbatch` and `gcloud` on PATH that
record their arguments, so nothing is trained, submitted or connected to.
"""

import os
import pathlib
import shlex
import subprocess

import pytest

# End-to-end runs: left out of the fast subset (pytest -m "not slow").
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
SCRIPTS = sorted(p.name for p in LAUNCH.glob('*.sh'))
CONFIG = 'configs/dfssd300_voc0712.py'
WORKDIR = 'runs/dfssd300 test'      # a space: arguments must survive quoting
EXTRA = ['--config.batch_size=64', '--config.data.root=/data/VOC devkit']  # quoting survives
MAIN = ['python', '-m', 'smallssd_jax.main']


@pytest.fixture
def fake_bin(tmp_path):
  """A PATH folder whose python / sbatch / gcloud append their argv (one JSON-free line each) to calls.txt."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  calls = tmp_path / 'calls.txt'
  for name in ('python', 'sbatch', 'gcloud'):
    tool = bin_dir / name
    # sbatch gets a script path: keep a copy of the script it would submit.
    tool.write_text('#!/usr/bin/env bash\n'
                    f'printf "%q " {name} "$@" >> {shlex.quote(str(calls))}; echo >> {shlex.quote(str(calls))}\n'
                    f'if [ {name} = sbatch ]; then cp "$1" {shlex.quote(str(tmp_path / "submitted.sbatch"))}; fi\n')
    tool.chmod(0o755)
  return bin_dir, calls


def launch(script, *args, path_prefix=None, env=None, cwd=None):
  full_env = dict(os.environ, **(env or {}))
  if path_prefix:
    full_env['PATH'] = f'{path_prefix}{os.pathsep}{full_env["PATH"]}'
  return subprocess.run(['bash', str(LAUNCH / script), *args], capture_output=True, text=True,
                        env=full_env, cwd=cwd or REPO, timeout=60)


def recorded(calls: pathlib.Path) -> list[list[str]]:
  if not calls.exists():
    return []
  return [shlex.split(line) for line in calls.read_text().splitlines() if line.strip()]


def train_args(command: list[str]) -> list[str]:
  """The arguments after `python -m smallssd_jax.main` in a command line."""
  for i in range(len(command) - len(MAIN) + 1):
    if command[i:i + len(MAIN)] == MAIN:
      return command[i + len(MAIN):]
  raise AssertionError(f'no `{" ".join(MAIN)}` in {command}')


@pytest.mark.parametrize('script', SCRIPTS)
def test_syntax(script):
  result = subprocess.run(['bash', '-n', str(LAUNCH / script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_every_script_is_covered():
  assert SCRIPTS == ['single_host.sh', 'slurm_gpu.sh', 'tpu_vm.sh']


# ------------------------------------------------------------ single host ---


def test_single_host_dry_run_and_run(fake_bin):
  bin_dir, calls = fake_bin
  args = [f'--config={CONFIG}', f'--workdir={WORKDIR}', '--gpus=0,1', '--', *EXTRA]
  dry = launch('single_host.sh', f'--config={CONFIG}', f'--workdir={WORKDIR}', '--gpus=0,1',
               '--dry-run', '--', *EXTRA, path_prefix=bin_dir)
  assert dry.returncode == 0, dry.stderr
  (line,) = dry.stdout.splitlines()
  command = shlex.split(line)
  assert command[:2] == ['env', 'CUDA_VISIBLE_DEVICES=0,1']
  assert train_args(command) == [f'--config={CONFIG}', f'--workdir={WORKDIR}', *EXTRA]
  assert recorded(calls) == [], '--dry-run runs nothing'

  run = launch('single_host.sh', *args, path_prefix=bin_dir)
  assert run.returncode == 0, run.stderr
  (call,) = recorded(calls)
  assert call == ['python', '-m', 'smallssd_jax.main', f'--config={CONFIG}', f'--workdir={WORKDIR}',
                  *EXTRA]


def test_single_host_without_gpus_uses_every_device():
  dry = launch('single_host.sh', f'--config={CONFIG}', '--workdir=runs/x', '--dry-run')
  assert dry.returncode == 0, dry.stderr
  assert shlex.split(dry.stdout) == [*MAIN, f'--config={CONFIG}', '--workdir=runs/x']


# ------------------------------------------------------------------ SLURM ---


def test_slurm_dry_run_prints_the_batch_script(fake_bin, tmp_path):
  bin_dir, calls = fake_bin
  args = ['--nodes=2', '--gpus-per-node=4', f'--config={CONFIG}', f'--workdir={tmp_path}/run',
          '--partition=gpu', '--time=12:00:00']
  dry = launch('slurm_gpu.sh', *args, '--dry-run', '--', *EXTRA, path_prefix=bin_dir,
               env={'VENV': '/opt/venv'})
  assert dry.returncode == 0, dry.stderr
  script = dry.stdout
  for directive in ('--nodes=2', '--ntasks-per-node=4', '--gpus-per-node=4', '--partition=gpu',
                    '--time=12:00:00', f'--output={tmp_path}/run/slurm-%j.out'):
    assert f'#SBATCH {directive}\n' in script, directive
  assert 'source /opt/venv/bin/activate' in script
  # srun starts one task per GPU, each running the trainer.
  srun = script[script.index('srun'):].replace('\\\n', ' ')
  srun_line = shlex.split(srun.splitlines()[0])
  assert srun_line[0] == 'srun' and '--gpus-per-task=1' in srun_line
  assert train_args(srun_line) == [f'--config={CONFIG}', f'--workdir={tmp_path}/run', *EXTRA]
  assert recorded(calls) == [] and not (tmp_path / 'run').exists(), '--dry-run submits nothing'

  run = launch('slurm_gpu.sh', *args, '--', *EXTRA, path_prefix=bin_dir, env={'VENV': '/opt/venv'})
  assert run.returncode == 0, run.stderr
  (call,) = recorded(calls)
  assert call[0] == 'sbatch'
  submitted = (tmp_path / 'submitted.sbatch').read_text()
  assert submitted.strip() == script.split('# submit with')[0].strip()
  # SLURM opens --output before the job starts: the folder must exist at submission.
  assert (tmp_path / 'run').is_dir()


def test_slurm_defaults():
  dry = launch('slurm_gpu.sh', f'--config={CONFIG}', '--workdir=/shared/x', '--dry-run')
  assert dry.returncode == 0, dry.stderr
  assert '#SBATCH --nodes=1\n' in dry.stdout and '#SBATCH --gpus-per-node=8\n' in dry.stdout
  assert '--partition' not in dry.stdout


# -------------------------------------------------------------------- TPU ---


def test_tpu_dry_run_and_run(fake_bin):
  bin_dir, calls = fake_bin
  args = ['--tpu=my-v4-32', '--zone=us-central2-b', '--project=my-proj', f'--config={CONFIG}',
          '--workdir=gs://bucket/runs/dfssd300']
  env = {'REPO_URL': 'https://example.com/smallssd_jax.git', 'TFDS_DATA_DIR': 'gs://bucket/tfds'}
  dry = launch('tpu_vm.sh', *args, '--setup', '--dry-run', '--', *EXTRA, path_prefix=bin_dir,
               env=env)
  assert dry.returncode == 0, dry.stderr
  setup, train = (shlex.split(line) for line in dry.stdout.splitlines())
  for command in (setup, train):
    assert command[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-v4-32']
    assert {'--zone=us-central2-b', '--worker=all', '--project=my-proj'} <= set(command)
  (setup_remote,) = [a[len('--command='):] for a in setup if a.startswith('--command=')]
  assert 'git clone https://example.com/smallssd_jax.git' in setup_remote
  assert "'jax[tpu]'" in setup_remote
  (remote,) = [a[len('--command='):] for a in train if a.startswith('--command=')]
  remote_words = shlex.split(remote)
  assert 'TFDS_DATA_DIR=gs://bucket/tfds' in remote_words
  assert train_args(remote_words) == [f'--config={CONFIG}', '--workdir=gs://bucket/runs/dfssd300',
                                      *EXTRA]
  assert recorded(calls) == []

  run = launch('tpu_vm.sh', *args, '--', *EXTRA, path_prefix=bin_dir, env=env)
  assert run.returncode == 0, run.stderr
  (call,) = recorded(calls)          # no --setup: only the training command
  assert call == train


# ----------------------------------------------------------- usage errors ---


@pytest.mark.parametrize('script,args,message', [
    ('single_host.sh', ['--workdir=w'], '--config is required'),
    ('single_host.sh', [f'--config={CONFIG}'], '--workdir is required'),
    ('slurm_gpu.sh', [f'--config={CONFIG}'], '--workdir is required'),
    ('slurm_gpu.sh', ['--workdir=w'], '--config is required'),
    ('tpu_vm.sh', ['--zone=z', f'--config={CONFIG}', '--workdir=w'], '--tpu is required'),
    ('tpu_vm.sh', ['--tpu=t', f'--config={CONFIG}', '--workdir=w'], '--zone is required'),
    ('tpu_vm.sh', ['--tpu=t', '--zone=z', '--workdir=w'], '--config is required'),
    ('tpu_vm.sh', ['--tpu=t', '--zone=z', f'--config={CONFIG}', '--workdir=w', '--setup'],
     'needs REPO_URL'),
    ('single_host.sh', [f'--config={CONFIG}', '--workdir=w', '--bogus'], 'unknown argument --bogus'),
    ('slurm_gpu.sh', ['--bogus'], 'unknown argument --bogus'),
    ('tpu_vm.sh', ['--bogus'], 'unknown argument --bogus'),
])
def test_usage_errors_exit_2(script, args, message, fake_bin):
  bin_dir, calls = fake_bin
  result = launch(script, *args, '--dry-run', path_prefix=bin_dir, env={'REPO_URL': ''})
  assert result.returncode == 2
  assert message in result.stderr
  assert result.stdout == '' and recorded(calls) == []
