"""Let a fresh venv see the packages of the Python that runs this script.

    python -m venv VENV && python scripts/link_site_packages.py VENV [--except DIR]

writes VENV's `_outer_site_packages.pth`: one line per package dir of this Python (its
site-packages, user site and the dirs its .pth files add), not its standard library (VENV has its
own, of the same version). torch and the rest are then not installed again. Run from a venv of
yours, this is what `venv --system-site-packages` is not: that option points VENV at the venv's
base Python, which may lack them. `--except DIR` leaves out DIR itself (a checkout whose editable
install must not leak in). The .pth files in those dirs are not run, so an editable install of
this Python stays out of VENV.
"""

import argparse
import os
import subprocess
import sys
import sysconfig


def package_dirs(leave_out: str | None = None) -> list[str]:
    """This interpreter's sys.path entries that hold installed packages."""
    stdlib = {os.path.realpath(sysconfig.get_path(key)) for key in ("stdlib", "platstdlib")}
    left_out = {os.path.dirname(os.path.realpath(__file__))}  # sys.path[0] when run as a script
    if leave_out:
        left_out.add(os.path.realpath(leave_out))
    dirs = []
    for entry in sys.path:
        path = os.path.realpath(entry) if entry else ""
        if not os.path.isdir(path) or path in stdlib or path in left_out:
            continue
        if os.path.basename(path) == "lib-dynload" or path in dirs:
            continue
        dirs.append(path)
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", help="a venv made by `python -m venv VENV`")
    parser.add_argument("--except", dest="leave_out", help="a dir to leave out (a checkout)")
    args = parser.parse_args()
    venv_python = os.path.join(args.venv, "bin", "python")
    if not os.path.exists(venv_python):
        hint = f"make it first (python -m venv {args.venv})"
        print(f"error: no {venv_python}: {hint}", file=sys.stderr)
        sys.exit(2)
    purelib = subprocess.run(
        [venv_python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(purelib, "_outer_site_packages.pth"), "w") as pth:
        pth.writelines(path + "\n" for path in package_dirs(args.leave_out))


if __name__ == "__main__":
    main()
