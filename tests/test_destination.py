"""The destination: what a build may replace and where it may write, and how it survives a full disk, read-only or
immutable folders, signals and a second build. Every fault: exit 2 (or the signal), a message naming the culprit,
no traceback, the sources and the destination unchanged, no staging folder or lock file left behind."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from builder import staging
from builder.build import build_bundle, plan_from_spec
from builder.cli import app
from builder.errors import OutputError
from helpers import assert_user_error, make_adapter, make_base_model, tree_snapshot, write_spec

NAME = "tiny-med"
REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def state(path: Path):
    """What a path is, to compare before and after: missing, a link, a file's bytes, or a folder's files and entries."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_file():
        return ("file", path.read_bytes())
    if path.is_dir():
        return ("folder", tree_snapshot(path), sorted(p.relative_to(path).as_posix() for p in path.rglob("*")))
    return None


def leftovers(folder: Path) -> list[str]:
    """Staging folders and lock files a build left below folder."""
    return sorted(p.name for p in folder.rglob("*.modelpack-*"))


@pytest.fixture(scope="module")
def sources(models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)
    return base, adapters(base)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, sources):
    """A real bundle (unverified), copied where a case needs an existing one."""
    root = tmp_path_factory.mktemp("bundle")
    result = run("build", write_spec(root, *sources), "--no-verify")
    assert result.exit_code == 0, result.output
    return root / "dist" / NAME


def _files(folder: Path, names: list[str], text: str = "someone's work") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


# Each case: setup(t) makes the destination and returns (extra CLI arguments, further paths that must stay
# unchanged); the message must contain every fragment, formatted with t.
DESTINATION_CASES = []


def case(*culprits: str):
    def register(setup):
        DESTINATION_CASES.append(pytest.param(setup, culprits, id=setup.__name__.replace("_", "-")))
        return setup
    return register


@case("output {t.dest} already exists; pass --force")
def exists_without_force(t):
    _files(t.dest, ["notes.txt"])
    return [], []


@case("--force replaces only a bundle modelpack built or an empty folder", "f0.txt, f1.txt", "and 3 more")
def foreign_folder_with_force(t):
    _files(t.dest, [f"f{i}.txt" for i in range(8)])
    return ["--force"], []


@case("no manifest.json written by modelpack", "data.bin")
def foreign_manifest_with_force(t):
    _files(t.dest, ["data.bin", "manifest.json"], '{"name": "tiny-med"}')
    return ["--force"], []


@case("no manifest.json written by modelpack", "load.py, manifest.json")
def corrupt_manifest_with_force(t):
    _files(t.dest, ["manifest.json", "load.py"], "{not json")
    return ["--force"], []


@case("--force would delete files modelpack did not write", "notes/mine.txt", "does not list")
def bundle_with_user_files_with_force(t):
    shutil.copytree(t.bundle, t.dest)
    _files(t.dest, ["notes/mine.txt"])
    return ["--force"], []


@case("output {t.dest} exists and is not a folder")
def file_as_destination(t):
    _files(t.dest.parent, [t.dest.name])
    return ["--force"], []


@case("output {t.dest} is a symbolic link", "remove the link")
def symlink_to_an_empty_folder(t):
    (t.tmp / "empty").mkdir()
    t.dest.parent.mkdir(parents=True)
    t.dest.symlink_to(t.tmp / "empty")
    return ["--force"], [t.tmp / "empty"]


@case("output {t.dest} is a symbolic link")
def symlink_to_a_bundle(t):
    shutil.copytree(t.bundle, t.tmp / "real")
    t.dest.parent.mkdir(parents=True)
    t.dest.symlink_to(t.tmp / "real")
    return ["--force"], [t.tmp / "real"]


@case("output {t.dest} is a symbolic link")
def dangling_symlink(t):
    t.dest.parent.mkdir(parents=True)
    t.dest.symlink_to(t.tmp / "nowhere")
    return ["--force"], []


@case("output {t.tmp}/models/bundle (resolved: {t.base}/bundle) overlaps the base.path folder {t.base}")
def inside_the_base_through_a_symlink(t):
    (t.tmp / "models").symlink_to(t.base)
    return ["-o", t.tmp / "models" / "bundle", "--force"], []


@case("overlaps the adapter.path folder {t.adapter}")
def inside_the_adapter_through_a_symlink_in_the_spec(t):
    (t.project / "ckpt").symlink_to(t.adapter)
    write_spec(t.project, t.base, t.adapter, output={"dir": "ckpt/bundle"})
    return ["--force"], []


@case("output {t.tmp}/base-link (resolved: {t.base}) overlaps the base.path folder")
def the_base_through_a_symlink(t):
    (t.tmp / "base-link").symlink_to(t.base)
    return ["-o", t.tmp / "base-link", "--force"], []


@case("output {t.base.parent} overlaps the base.path folder {t.base}")
def a_folder_holding_the_base(t):
    return ["-o", t.base.parent, "--force"], []


@case("output {t.project} holds the spec file {t.spec}")
def the_spec_folder(t):
    return ["-o", t.project, "--force"], []


@case("output {t.project} holds the spec file")
def the_spec_folder_as_output_dir(t):
    write_spec(t.project, t.base, t.adapter, output={"dir": "."})
    return ["--force"], []


@case("is the current folder {t.tmp}/work")
def the_current_folder(t):
    _files(t.tmp / "work", ["mine.txt"])
    t.monkeypatch.chdir(t.tmp / "work")
    return ["-o", ".", "--force"], []


@case("output {t.tmp} holds the current folder {t.tmp}/work")
def a_parent_of_the_current_folder(t):
    _files(t.tmp / "work", ["mine.txt"])
    t.monkeypatch.chdir(t.tmp / "work")
    return ["-o", "..", "--force"], []


@case("is your home folder {t.tmp}/home")
def the_home_folder(t):
    _files(t.tmp / "home", [".bashrc"])
    t.monkeypatch.setenv("HOME", str(t.tmp / "home"))
    return ["-o", t.tmp / "home", "--force"], []


@case("output / holds the current folder")
def the_root_folder(t):
    return ["-o", "/", "--force"], []


@case("cannot create {t.tmp}/afile/sub", "{t.tmp}/afile is a file in the way")
def a_file_in_the_way(t):
    _files(t.tmp, ["afile"])
    return ["-o", t.tmp / "afile" / "sub" / "bundle"], []


@case("is too long for the filesystem of {t.tmp}: it has 240 bytes", "choose a shorter name")
def a_name_too_long(t):
    return ["-o", t.tmp / ("x" * 240)], []


@case("dist/tiny\\x00med (output.dir): the name holds a control or unprintable character", "rename it")
def a_nul_in_the_name(t):
    write_spec(t.project, t.base, t.adapter, output={"dir": "dist/tiny\0med"})
    return [], []


@pytest.mark.parametrize("setup, culprits", DESTINATION_CASES)
def test_a_refused_destination_is_exit_2_and_nothing_changes(tmp_path, sources, bundle, monkeypatch, setup, culprits):
    base, adapter = sources
    project = tmp_path / "project"
    project.mkdir()
    t = SimpleNamespace(tmp=tmp_path, project=project, spec=write_spec(project, base, adapter), base=base,
                        adapter=adapter, bundle=bundle, dest=project / "dist" / NAME, monkeypatch=monkeypatch)
    extra, watched = setup(t)
    watched = [base, adapter, project, t.dest, *watched]
    before = [state(p) for p in watched]
    root_before = sorted(os.listdir("/"))
    result = run("build", t.spec, "--no-verify", *extra)
    assert_user_error(result, 2, *(c.format(t=t) for c in culprits))
    assert [state(p) for p in watched] == before
    assert sorted(os.listdir("/")) == root_before
    assert leftovers(tmp_path) == []


def test_a_destination_another_build_holds_is_refused_at_once_naming_its_pid(tmp_path, sources):
    spec = write_spec(tmp_path, *sources)
    dest = tmp_path / "dist" / NAME
    dest.parent.mkdir()
    # Held as a running build holds it: flock conflicts between two opens of the file, even in one process.
    with open(staging.lock_path(dest), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        result = run("build", spec, "--no-verify", "--force")
    assert_user_error(result, 2,
                      f"another modelpack build (pid 4242) is writing {dest}; wait for it or build elsewhere")
    assert sorted(p.name for p in dest.parent.iterdir()) == [f".{NAME}.modelpack-lock"]


def test_force_replaces_a_modelpack_bundle_or_an_empty_folder(tmp_path, sources, bundle):
    spec = write_spec(tmp_path, *sources, output={"dtype": "bfloat16"})
    dest = tmp_path / "dist" / NAME
    shutil.copytree(bundle, dest)
    (dest / "__pycache__").mkdir()  # importing load.py leaves this; it is no one's work
    result = run("build", spec, "--no-verify", "--force")
    assert result.exit_code == 0, result.output
    assert (dest / "model.safetensors").stat().st_size < (bundle / "model.safetensors").stat().st_size  # bfloat16
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("build", spec, "--no-verify", "--force", "-o", empty)
    assert result.exit_code == 0, result.output
    assert (empty / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_a_build_removes_only_stale_staging_folders_and_says_what_it_freed(tmp_path, sources):
    spec = write_spec(tmp_path, *sources)
    dist = tmp_path / "dist"
    stale = dist / f".{NAME}.modelpack-staging-999999"
    (stale / NAME).mkdir(parents=True)
    (stale / NAME / "model.safetensors").write_bytes(b"\0" * 1_500_000)
    others = [f".{NAME}.modelpack-staging-x1", f".{NAME}.staging-123", ".other.modelpack-staging-5",
              f".{NAME}.modelpack-staging-7.modelpack-staging-8"]
    for name in others:
        _files(dist / name, ["keep.txt"])
    result = run("build", spec, "--no-verify")
    assert result.exit_code == 0, result.output
    assert (f"removed stale staging folder .{NAME}.modelpack-staging-999999 (1.5 MB) left by an interrupted build"
            in result.output)
    assert sorted(p.name for p in dist.iterdir()) == sorted([*others, NAME])


def test_the_staging_folder_has_the_bundle_name_inside_a_hidden_folder_and_goes_on_failure(tmp_path):
    """transformers 4.x imports remote code as `transformers_modules.<folder name>`: no dot may be in that name."""
    dest = tmp_path / "qwen-7b-chat"
    with pytest.raises(RuntimeError):
        with staging.staging_folder(dest) as folder:
            assert folder.name == "qwen-7b-chat"
            assert folder.parent == tmp_path / f".qwen-7b-chat.modelpack-staging-{os.getpid()}"
            raise RuntimeError("the build failed")
    assert list(tmp_path.iterdir()) == []


def test_publish_swaps_atomically_through_the_raw_syscall_too(tmp_path, monkeypatch):
    """glibc < 2.28 has no renameat2 wrapper: the syscall number is used instead."""
    import platform

    if staging._LIBC is None or platform.machine() not in staging.RENAMEAT2_SYSCALL:
        pytest.skip(f"renameat2 is Linux-only; no syscall number known for {platform.machine()}")
    monkeypatch.setattr(staging, "_LIBC", SimpleNamespace(syscall=staging._LIBC.syscall))
    _files(tmp_path / "a", ["old.txt"])
    _files(tmp_path / "b", ["new.txt"])
    assert staging._exchange(tmp_path / "a", tmp_path / "b")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["new.txt"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["old.txt"]


def test_publish_without_an_atomic_exchange_renames_twice(tmp_path, sources, bundle, monkeypatch):
    """Where the OS or filesystem has no exchange (EINVAL, ENOSYS, not Linux), the two-rename fallback still
    replaces the bundle and leaves nothing behind."""
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    spec = write_spec(tmp_path, *sources, output={"dtype": "bfloat16"})
    dest = tmp_path / "dist" / NAME
    shutil.copytree(bundle, dest)
    build_bundle(plan_from_spec(spec), force=True, verify=False)
    assert tree_snapshot(dest) != tree_snapshot(bundle) and (dest / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


# Faults of the filesystem, made without root on the host: a user and mount namespace (`unshare -rm`) may mount a
# small tmpfs or a read-only bind mount that only the build inside sees; chattr needs root.
def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-rm", "true"]).returncode == 0


needs_namespaces = pytest.mark.skipif(
    not _can_unshare(), reason="needs unprivileged user and mount namespaces (unshare -rm) to mount a tmpfs or a "
    "read-only folder without root; this kernel or its security policy does not allow them"
)


def cli_in_shell(script: str, *, prefix: list[str]) -> SimpleNamespace:
    """Run a shell script (which calls `$MODELPACK build ...`) under prefix; a result like CliRunner's."""
    env = {**os.environ, "MODELPACK": f"{sys.executable} -m builder", "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                             timeout=300)
    return SimpleNamespace(output=process.stdout + process.stderr, exit_code=process.returncode, exception=None)


@pytest.fixture
def fs_case(tmp_path, sources, bundle):
    """A spec, and a folder out/ holding an existing bundle that a forced build would replace."""
    out = tmp_path / "out"
    shutil.copytree(bundle, out / NAME)
    case = SimpleNamespace(spec=write_spec(tmp_path, *sources), out=out, dest=out / NAME, watched=[*sources, out])
    case.before = [state(p) for p in case.watched]
    return case


@needs_namespaces
def test_a_read_only_parent_folder_is_exit_2(fs_case):
    out = fs_case.out
    result = cli_in_shell(
        f"mount --bind {out} {out} && mount -o remount,ro,bind {out} && "
        f"$MODELPACK build {fs_case.spec} -o {fs_case.dest} --force --no-verify", prefix=["unshare", "-rm"])
    assert_user_error(result, 2, f"{out} is on a read-only filesystem; pass -o to build elsewhere")
    assert [state(p) for p in fs_case.watched] == fs_case.before


def test_a_parent_folder_without_write_permission_is_exit_2(fs_case):
    # root bypasses permissions: run the build as another user where we are root (a user namespace maps it to us).
    prefix = []
    if os.geteuid() == 0:
        if not _can_unshare():
            pytest.skip("as root, a permission check needs a non-root user: unshare --map-user is not allowed here")
        prefix = ["unshare", "--user", "--map-user=65534"]
    fs_case.out.chmod(0o555)
    try:
        result = cli_in_shell(f"$MODELPACK build {fs_case.spec} -o {fs_case.dest} --force --no-verify", prefix=prefix)
    finally:
        fs_case.out.chmod(0o755)
    assert_user_error(result, 2, f"permission denied writing {fs_case.out}/.{NAME}.modelpack-lock",
                      f"make {fs_case.out} writable")
    assert [state(p) for p in fs_case.watched] == fs_case.before


def test_an_immutable_parent_folder_is_exit_2(fs_case):
    if subprocess.run(["chattr", "+i", str(fs_case.out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root (CAP_LINUX_IMMUTABLE) and a filesystem with inode attributes")
    try:
        result = run("build", fs_case.spec, "-o", fs_case.dest, "--force", "--no-verify")
    finally:
        subprocess.run(["chattr", "-i", str(fs_case.out)], check=True)
    assert_user_error(result, 2, f"operation not permitted writing {fs_case.out}/.{NAME}.modelpack-lock",
                      f"{fs_case.out} may be immutable")
    assert [state(p) for p in fs_case.watched] == fs_case.before


@pytest.mark.parametrize("code, named, path", [
    (errno.EACCES, "{dest}/.tmp", "{dest}/.tmp"),  # a path the write named
    (errno.ENOSPC, None, "{parent}"),  # a failed write() names no file: the destination's folder
])
def test_an_output_error_carries_the_path_and_errno_it_is_about(tmp_path, code, named, path):
    dest = tmp_path / "out" / NAME
    dest.parent.mkdir()  # a full disk is described from its folder's statvfs
    with pytest.raises(OutputError) as caught, staging.output_errors(dest, needed=1000):
        raise OSError(code, os.strerror(code), *([named.format(dest=dest)] if named else []))
    assert caught.value.path == Path(path.format(dest=dest, parent=dest.parent))
    assert caught.value.errno == code


def test_an_error_of_another_path_is_no_output_error(tmp_path):
    with pytest.raises(PermissionError), staging.output_errors(tmp_path / "out" / NAME, needed=1000):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "source" / "config.json"))


@needs_namespaces
@pytest.mark.parametrize("options, culprits", [
    # Too small for the bundle: refused before any work, saying how much it needs.
    ("size=1m", ["output {mnt}/tiny-med: the bundle needs", "MB but {mnt} has 1.0 MB free"]),
    # Room for the bytes but not for the files (tmpfs inodes): the write itself fails half way.
    ("size=64m,nr_inodes=8", ["the filesystem of {mnt} has no free inodes (file entries) left while writing {mnt}/.",
                              "the bundle needs"]),
], ids=["too-small", "full-during-the-write"])
def test_a_full_disk_is_exit_2_and_leaves_nothing(tmp_path, sources, options, culprits):
    mnt = tmp_path / "small"
    mnt.mkdir()
    spec = write_spec(tmp_path, *sources)
    before = [state(p) for p in sources]
    result = cli_in_shell(
        f"mount -t tmpfs -o {options} modelpack-test {mnt} && $MODELPACK build {spec} -o {mnt}/{NAME} --no-verify; "
        f"rc=$?; echo \"left: [$(ls -A {mnt})]\"; exit $rc", prefix=["unshare", "-rm"])
    assert_user_error(result, 2, *(c.format(mnt=mnt) for c in culprits), "left: []")
    assert [state(p) for p in sources] == before


class Build:
    """`modelpack build` as a process in a session of its own (a test can signal it, and end its children), with
    its output collected line by line while it runs."""

    def __init__(self, *args):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "builder", "build", *map(str, args)], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True,
            # A user's Ctrl-C from a terminal, whatever this suite inherited (nohup and some CI runners start it with
            # SIGINT ignored, which the build would keep, rightly, for its own process).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"the build ended before {what}:\n{''.join(self.lines)}"
            assert time.monotonic() < deadline, f"no {what} after {timeout}s:\n{''.join(self.lines)}"
            time.sleep(0.002)

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def kill(self, sig: int) -> None:
        """Send sig to the build alone; after SIGKILL, end what it left running (its verification), as a power
        loss would."""
        os.kill(self.process.pid, sig)
        if sig == signal.SIGKILL:
            self.process.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def finish(self, timeout: float = 600) -> SimpleNamespace:
        self.process.wait(timeout)
        self._reader.join()
        return SimpleNamespace(output="".join(self.lines), exit_code=self.process.returncode, exception=None)


@pytest.fixture(scope="module")
def medium_sources(tmp_path_factory):
    """A base big enough (36 MB) that its merge takes a visible moment, for killing a build during it."""
    root = tmp_path_factory.mktemp("medium")
    base = make_base_model(root / "base", arch="qwen2", tied=True, dtype=torch.float32, hidden_size=512,
                           intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8)
    return base, make_adapter(root / "adapter" / "checkpoint-10", base)


def _existing_bundle(tmp_path: Path, sources) -> tuple[Path, Path]:
    """A spec and an existing bundle at its destination (bfloat16, so the new float32 one differs)."""
    old = write_spec(tmp_path, *sources, output={"dtype": "bfloat16"})
    assert run("build", old, "--no-verify").exit_code == 0
    return write_spec(tmp_path, *sources), tmp_path / "dist" / NAME


def _staging_folders(dest: Path) -> list[Path]:
    return sorted(dest.parent.glob(f".{dest.name}.modelpack-staging-*"))


def _rebuild_frees(spec: Path, dest: Path, stale: list[Path]) -> None:
    """The next build to dest removes what the killed one left and says so."""
    assert len(stale) == 1, stale
    result = run("build", spec, "--no-verify", "--force")
    assert result.exit_code == 0, result.output
    assert re.search(rf"removed stale staging folder {stale[0].name} \(\d+\.\d [KMG]B\) left by an interrupted build",
                     result.output), result.output
    assert leftovers(dest.parent) == []


@pytest.mark.slow
def test_sigkill_during_the_merge_keeps_the_destination_and_the_next_build_frees_its_staging(tmp_path, medium_sources):
    spec, dest = _existing_bundle(tmp_path, medium_sources)
    before = [state(dest), *(state(p) for p in medium_sources)]
    build = Build(spec, "--no-verify", "--force")
    def merging() -> bool:  # a few MB of the 36 MB weight file written
        return any(p.stat().st_size > 4e6
                   for p in dest.parent.glob(f".{NAME}.modelpack-staging-*/{NAME}/*.safetensors"))

    build.wait_for(merging, "the merge")
    build.kill(signal.SIGKILL)
    assert build.finish().exit_code == -signal.SIGKILL
    assert [state(dest), *(state(p) for p in medium_sources)] == before
    _rebuild_frees(spec, dest, _staging_folders(dest))


@pytest.mark.slow
def test_sigkill_during_verification_keeps_the_destination_and_the_next_build_frees_its_staging(tmp_path, sources):
    spec, dest = _existing_bundle(tmp_path, sources)
    before = [state(dest), *(state(p) for p in sources)]
    build = Build(spec, "--force")
    build.wait_for(lambda: build.said("verifying"), "verification")
    build.kill(signal.SIGKILL)
    assert build.finish().exit_code == -signal.SIGKILL
    assert [state(dest), *(state(p) for p in sources)] == before
    _rebuild_frees(spec, dest, _staging_folders(dest))


@pytest.mark.slow
def test_sigint_during_verification_removes_the_staging_and_keeps_the_destination(tmp_path, sources):
    spec, dest = _existing_bundle(tmp_path, sources)
    before = [state(dest), *(state(p) for p in sources)]
    build = Build(spec, "--force")
    build.wait_for(lambda: build.said("verifying"), "verification")
    build.kill(signal.SIGINT)
    result = build.finish()
    assert result.exit_code == 130 and "Traceback" not in result.output, result.output
    assert "interrupted: nothing was published" in result.output
    assert [state(dest), *(state(p) for p in sources)] == before
    assert leftovers(tmp_path) == []


class _SwallowsCtrlC:
    """Ctrl-C arriving where Python cannot raise it: in a __del__ (like an at-fork hook, as filelock's was when CI
    sent SIGINT while the verification process was being forked), Python prints the KeyboardInterrupt and goes on."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


def test_a_ctrl_c_that_a_library_swallows_still_publishes_nothing(tmp_path, sources, capfd):
    # As the suite found it: the default handler from a terminal, SIG_IGN when started in the background (nohup).
    disposition = signal.getsignal(signal.SIGINT)
    spec, dest = _existing_bundle(tmp_path, sources)
    before = [state(dest), *(state(p) for p in sources)]

    def progress(line: str) -> None:
        if line.startswith("writing"):
            _SwallowsCtrlC()  # created and collected at once, inside the build
    with pytest.raises(KeyboardInterrupt):
        build_bundle(plan_from_spec(spec), force=True, verify=False, progress=progress)
    assert "Traceback" not in capfd.readouterr().err  # recorded, not printed as "Exception ignored"
    assert [state(dest), *(state(p) for p in sources)] == before
    assert leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is disposition  # the build's handler is gone with it


@pytest.mark.slow
def test_a_second_build_to_the_same_destination_is_refused_naming_the_first(tmp_path, sources):
    spec = write_spec(tmp_path, *sources)
    dest = tmp_path / "dist" / NAME
    first = Build(spec)
    first.wait_for(lambda: first.said("verifying"), "verification")
    second = Build(spec, "--no-verify", "--force")
    assert_user_error(second.finish(), 2, f"another modelpack build (pid {first.process.pid}) is writing {dest}")
    result = first.finish()
    assert result.exit_code == 0, result.output
    assert (dest / "verification.json").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_bundle_replaced_with_force_exists_at_every_moment(tmp_path, medium_sources):
    spec, dest = _existing_bundle(tmp_path, medium_sources)
    old = (dest / "manifest.json").read_text()
    build = Build(spec, "--no-verify", "--force")
    seen = set()
    while build.process.poll() is None:
        # Whole bundles only: the manifest and every file it lists, old or new, never a missing path.
        manifest = json.loads((dest / "manifest.json").read_text())
        assert all((dest / name).is_file() for name in manifest["files"]), manifest["files"]
        seen.add((dest / "manifest.json").read_text() == old)
        time.sleep(0.001)
    assert build.finish().exit_code == 0
    assert (dest / "manifest.json").read_text() != old and True in seen
    assert leftovers(tmp_path) == []


def test_a_failure_writing_the_other_files_stops_the_weights_and_publishes_nothing(tmp_path, sources, monkeypatch):
    """The side files are written while the weights stream; when they fail, the weights stop at their next chunk
    rather than running to the end, and the staging folder goes."""
    import builder.build
    from builder.errors import SourceError

    def failing_files(plan, staging):
        raise SourceError("chat template cannot be rendered: boom")

    chunks_after_failure = []

    def endless_weights(plan, staging, *, on_bytes):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the real writer calls on_bytes after every chunk
            on_bytes(1)
            chunks_after_failure.append(1)
            time.sleep(0.01)
        raise AssertionError("the weights were not stopped")

    monkeypatch.setattr(builder.build, "_write_files", failing_files)
    monkeypatch.setattr(builder.build, "write_weights", endless_weights)
    dest = tmp_path / "out" / NAME
    with pytest.raises(SourceError, match="boom"):
        build_bundle(plan_from_spec(write_spec(tmp_path, *sources, output={"dir": str(dest)})), verify=False)
    assert len(chunks_after_failure) < 100 and not dest.exists() and leftovers(tmp_path / "out") == []
