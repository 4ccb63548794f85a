r"""Downloads the wheels benchmarks/gpu_check.py needs on the lent GPU machine and its image lacks.

  python benchmarks/gpu_wheels.py --list    # names and versions only, no download (CI runs this)
  python benchmarks/gpu_wheels.py           # into .whl/ (git-ignored), for Python 3.12 manylinux x86_64

The machine reaches no registry, so what its image lacks (tests/data/gpu_image_packages.txt) travels with the working
tree as wheels (`carry: [".whl"]`), pinned in benchmarks/gpu_wheels.txt, and is installed there to a temporary
target put on PYTHONPATH: BENCHMARKS.md, "GPU", gives the one command. Everything that travels must stay under
64 MiB, so the total is printed and more than that is an error.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PINS = ROOT / 'benchmarks' / 'gpu_wheels.txt'
DEST = ROOT / '.whl'
LIMIT_BYTES = 64 * 2**20  # the device tool's limit on the working tree that travels, wheels included
# The GPU machine: Python 3.12 (CPython), x86-64 Linux. pip matches a manylinux tag exactly, hence the list.
TARGET = ['--python-version', '3.12', '--implementation', 'cp', '--platform', 'manylinux_2_28_x86_64',
          '--platform', 'manylinux_2_27_x86_64', '--platform', 'manylinux_2_17_x86_64', '--platform',
          'manylinux2014_x86_64', '--platform', 'manylinux1_x86_64']


def pins(path: pathlib.Path = PINS) -> list[str]:
  """The `name==version` lines of `path`, comments dropped; an unpinned line is an error (what travels must be
  what CI tested)."""
  found = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    requirement = line.split('#')[0].strip()
    if not requirement:
      continue
    name, _, version = requirement.partition('==')
    if not version or not name.strip():
      raise ValueError(f'{path}:{number}: {requirement!r} is not pinned as name==version')
    found.append(f'{name.strip()}=={version.strip()}')
  return found


def _wheel_key(name: str, version: str) -> tuple[str, str]:
  """A wheel file's name and version as a pin's: the file name spells 'open-clip-torch' 'open_clip_torch'."""
  return re.sub(r'[-_.]+', '_', name).lower(), version


def download(requirements: list[str], dest: pathlib.Path) -> int:
  """pip-downloads `requirements` (binary wheels only, no dependencies: each is named) into `dest`; returns the
  total size in bytes of the wheels there."""
  dest.mkdir(parents=True, exist_ok=True)
  command = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--only-binary=:all:', *TARGET, '-d',
             str(dest), *requirements]
  subprocess.run(command, check=True)
  return sum(p.stat().st_size for p in dest.glob('*.whl'))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--list', action='store_true', help='print the pinned wheels and exit; downloads nothing')
  parser.add_argument('--dest', type=pathlib.Path, default=DEST, help='where the wheels go (default: .whl/)')
  args = parser.parse_args(argv)
  requirements = pins()
  if args.list:
    print('\n'.join(requirements))
    return 0
  # Two versions of one package stop the install there. Wheels of other packages may share the folder (tokamax's,
  # for the 'mosaic' rows: BENCHMARKS.md).
  wanted = dict(_wheel_key(*r.split('==')) for r in requirements)
  present = sorted(args.dest.glob('*.whl')) if args.dest.exists() else []
  stale = []
  for wheel in present:
    name, version = _wheel_key(*wheel.name.split('-')[:2])
    if wanted.get(name, version) != version:
      stale.append(wheel.name)
  if stale:
    raise SystemExit(f'error: {args.dest} holds other versions of pinned wheels: {", ".join(stale)}; remove them')
  total = download(requirements, args.dest)
  wheels = sorted(args.dest.glob('*.whl'))
  for wheel in wheels:
    print(f'{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}')
  print(f'{total / 2**20:7.2f} MiB  total, {len(wheels)} wheels in {args.dest} (limit {LIMIT_BYTES / 2**20:.0f} MiB '
        'for everything that travels)')
  if total > LIMIT_BYTES:
    print('error: the wheels alone are over the limit', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
