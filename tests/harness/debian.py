"""The Debian package (``debian/``): build it from a copy of the work tree, install, upgrade and
purge it on this machine.

The build runs ``dpkg-buildpackage -us -uc -b`` in a temporary copy of the repository (the
files git tracks plus the untracked ones it does not ignore, as they are now, so uncommitted
work is packaged too), with an environment cleaned of this test run's virtualenv and of this
machine's local pip sources, so the package is built the way it would be on a fresh machine.

Installing touches the real system (that is what is being tested): :func:`purge` removes the
package, its configuration and its generated files again, :func:`remove_service_user` the
system user a purge keeps.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.harness.stalroute import REPO_ROOT

PACKAGE = "stalroute"
VENV = Path("/usr/lib/stalroute/venv")
CONFIG_DIR = Path("/etc/stalroute")
CONFIG = CONFIG_DIR / "stalroute.toml"
UNIT = Path("/lib/systemd/system/stalroute.service")
WANTS_LINK = Path("/etc/systemd/system/multi-user.target.wants/stalroute.service")
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Environment variables of this test run that must not reach the package build or the
#: maintainer scripts (the test virtualenv, local pip sources, the proxy's own settings).
_DROPPED = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PIP_FIND_LINKS",
            "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_REQUIRE_VIRTUALENV")


class PackageError(RuntimeError):
    """A dpkg/apt/build command failed; the message carries its output."""


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without the test virtualenv, pip's local sources and STALROUTE_*/PROXY_*;
    ``PATH`` is the standard system one; non-interactive apt/dpkg."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _DROPPED and not k.startswith(("STALROUTE_", "PROXY_", "PYENV_"))
    }
    env.update(PATH=STANDARD_PATH, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")
    env.update(extra)
    return env


def run(argv: list[str], *, timeout: float = 300, check: bool = True,
        cwd: Path | None = None, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with :func:`clean_env`; stdout and stderr merged into ``.stdout``.
    ``check``: raise :class:`PackageError` with the output on a non-zero exit."""
    result = subprocess.run(
        argv, cwd=cwd, env=env or clean_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )
    if check and result.returncode != 0:
        raise PackageError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-8000:]}"
        )
    return result


# --- build -----------------------------------------------------------------------------------


def work_tree_files(repo: Path = REPO_ROOT) -> list[str]:
    """Paths (relative) of the files git tracks plus the untracked, not ignored ones."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, stdout=subprocess.PIPE,
    ).stdout.decode()
    return sorted({p for p in out.split("\0") if p and (repo / p).is_file()})


def copy_work_tree(dest: Path, repo: Path = REPO_ROOT) -> Path:
    """Copy the work tree's files (see :func:`work_tree_files`) to ``dest``; return it."""
    for relative in work_tree_files(repo):
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / relative, target, follow_symlinks=False)
    return dest


def package_version(source: Path) -> str:
    """The version at the top of ``debian/changelog``."""
    return run(["dpkg-parsechangelog", "-l", str(source / "debian/changelog"), "-S", "Version"],
               cwd=source).stdout.strip()


def build_package(workdir: Path, timeout: float = 900) -> Path:
    """Copy the work tree to ``workdir/src`` and run ``dpkg-buildpackage -us -uc -b`` there.
    Returns the ``.deb``; the build log is ``workdir/build.log``."""
    source = copy_work_tree(workdir / "src")
    log = workdir / "build.log"
    with log.open("w") as out:
        result = subprocess.run(
            ["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source, env=clean_env(),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
        )
    if result.returncode != 0:
        raise PackageError(f"dpkg-buildpackage exited {result.returncode}; log tail:\n"
                           + log.read_text(errors="replace")[-8000:])
    arch = run(["dpkg-architecture", "-qDEB_HOST_ARCH"]).stdout.strip()
    deb = workdir / f"{PACKAGE}_{package_version(source)}_{arch}.deb"
    if not deb.is_file():
        raise PackageError(f"{deb.name} missing after the build; found "
                           f"{sorted(p.name for p in workdir.iterdir())}")
    return deb


def repack_as_upgrade(deb: Path, workdir: Path, suffix: str = "+upgradetest1",
                      conffile_addition: str = "") -> Path:
    """A copy of ``deb`` whose version is newer (``suffix`` appended) and whose
    ``stalroute.toml`` has ``conffile_addition`` appended: installing it is a real upgrade
    in which the package's conffile changed too (dpkg's conffile prompt case)."""
    root = workdir / "repack"
    shutil.rmtree(root, ignore_errors=True)
    run(["dpkg-deb", "-R", str(deb), str(root)])
    control = root / "DEBIAN/control"
    lines = control.read_text().splitlines()
    control.write_text("".join(
        (f"{line}{suffix}" if line.startswith("Version: ") else line) + "\n" for line in lines
    ))
    version = next(line.split(": ", 1)[1] for line in control.read_text().splitlines()
                   if line.startswith("Version: "))
    if conffile_addition:
        conffile = root / CONFIG.relative_to("/")
        conffile.write_text(conffile.read_text() + conffile_addition)
        md5 = run(["md5sum", str(CONFIG.relative_to("/"))], cwd=root).stdout
        md5sums = root / "DEBIAN/md5sums"
        kept = [ln for ln in md5sums.read_text().splitlines()
                if not ln.endswith(str(CONFIG.relative_to("/")))]
        md5sums.write_text("\n".join(kept + [md5.strip()]) + "\n")
    out = workdir / f"{PACKAGE}_{version}_upgrade.deb"
    run(["dpkg-deb", "--root-owner-group", "-Znone", "-b", str(root), str(out)])
    shutil.rmtree(root, ignore_errors=True)
    return out


# --- install / purge -------------------------------------------------------------------------


@contextlib.contextmanager
def exclusive_installation(timeout: float = 900) -> Iterator[None]:
    """Hold the machine-wide lock that says "a test owns the stalroute package now", so two
    test runs on one machine never install and purge it under each other."""
    folder = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")
    with open(folder / "stalroute-test-debian.lock", "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PackageError("another test run kept the package lock") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def installed_version() -> str | None:
    """Version of the installed package, or None (not installed, or only config left)."""
    result = run(["dpkg-query", "-W", "-f=${Status}\t${Version}", PACKAGE], check=False)
    if result.returncode != 0:
        return None
    status, _, version = result.stdout.partition("\t")
    return version if status.strip() == "install ok installed" else None


def package_state() -> str:
    """dpkg's status words (``install ok installed``, ``deinstall ok config-files``), or
    ``not-installed``."""
    result = run(["dpkg-query", "-W", "-f=${Status}", PACKAGE], check=False)
    status = result.stdout.strip() if result.returncode == 0 else ""
    if not status or status.endswith(" not-installed"):
        return "not-installed"
    return status


def install(deb: Path) -> str:
    """``dpkg -i --force-confold deb`` (keep edited conffiles without asking); when
    dependencies are missing, ``apt-get install -f`` completes it. Returns dpkg's output."""
    result = run(["dpkg", "-i", "--force-confold", str(deb)], check=False, timeout=600)
    output = result.stdout
    if result.returncode != 0:
        fix = run(
            ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-o", "Dpkg::Options::=--force-confold",
             "install", "-f", "-y", "--no-install-recommends"],
            check=False, timeout=600,
        )
        output += fix.stdout
        if fix.returncode != 0 or installed_version() is None:
            raise PackageError(f"installing {deb.name} failed:\n{output[-8000:]}")
    return output


def purge() -> str:
    """``dpkg --purge stalroute`` when anything of it is on the system; returns the output."""
    if package_state() == "not-installed":
        return ""
    return run(["dpkg", "--purge", PACKAGE], timeout=300).stdout


def remove_service_user() -> None:
    """Delete the ``stalroute`` system user and group, which a purge keeps (Debian practice)."""
    if _exists(pwd.getpwnam, PACKAGE):
        run(["deluser", "--system", PACKAGE])
    if _exists(grp.getgrnam, PACKAGE):
        run(["delgroup", "--system", PACKAGE])


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def lintian(deb: Path) -> list[str]:
    """lintian's tag lines (``E: ...``, ``W: ...``) for ``deb``."""
    result = run(["lintian", "--no-tag-display-limit", str(deb)], check=False, timeout=600)
    if result.returncode not in (0, 1):  # 1: tags at the fail-on level; 2: lintian failed
        raise PackageError(f"lintian exited {result.returncode}:\n{result.stdout[-4000:]}")
    return [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:")]


def deb_members(deb: Path) -> list[str]:
    """Paths in the data archive of ``deb``, as ``dpkg-deb -c`` names them
    (``./usr/bin/stalroute``); a symlink's own path, not its target."""
    members = []
    for line in run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines():
        name = line.split(None, 5)[5]
        members.append(name.split(" -> ")[0])
    return members
