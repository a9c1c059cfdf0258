"""The run directory and its manifest (`edgeft.json`): the only contract between stages.

Every write here is atomic (temp file or temp directory, then `os.replace`), so an interrupted
command never leaves a half-written manifest, adapter or export behind. A folder that replaces an
existing one is swapped in with one atomic exchange on Linux; elsewhere it takes two renames, and
a folder left hidden by a kill between them is put back by the next command that looks for it
(`restore_interrupted`: staged_dir, Run.open, the model cache and resolve_export call it). A staging
folder is locked while its process fills it; one a SIGKILL or a power cut left unlocked is deleted
by the next staged_dir of the same folder (`_remove_abandoned`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft import __version__
from edgeft.errors import DiskSpaceError, RunError

MANIFEST = "edgeft.json"
MERGE_RECORD = "edgeft-merge.json"  # merged/'s own record, written inside it before it is put in place
HELD_OUT = "data/validation.jsonl"  # the validation split tune holds out of --data, inside the run
# A run's two lock files (see Run.lock and Run._manifest_held): small, and left in place on purpose
LOCK_FILES = (".edgeft.lock", ".edgeft.json.lock")
SCHEMA_VERSION = 1

log = logging.getLogger(__name__)


def now() -> str:
    """UTC timestamp for the manifest, to the second."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see either the old file or the new one, never half of one."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file in one rename, with the permissions a plain open() would give it (mkstemp's
    0600 would keep a run made by one user or container from being served by another)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask sets it process-wide)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_json(path: Path, what: str = "file") -> dict:
    """Read a JSON object, turning a corrupt or missing file into a message that names it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{what} {path} is not valid JSON ({e}). Delete it or re-run the stage that wrote it.") from None
    if not isinstance(data, dict):
        raise RunError(f"{what} {path} should hold a JSON object, found {type(data).__name__}.")
    return data


def check_free_space(path: Path, need_bytes: int, what: str) -> None:
    """Fail before starting work that would run out of disk halfway."""
    path = Path(path)
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise DiskSpaceError(
            f"{what} needs about {human_size(need_bytes)} of free disk at {probe}, "
            f"but only {human_size(free)} is free. Free some space or point EDGEFT_HOME / --output elsewhere."
        )


def human_size(n: float) -> str:
    """1536 -> '1.5 KB' (decimal units, like `ls -h --si` and model cards)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def dir_size(path: Path) -> int:
    """Total bytes of the regular files under `path`."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's ru_maxrss carries over the parent's peak into a
    forked-then-exec'd child; VmHWM belongs to the new address space alone."""
    import resource

    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def staged_dir(target: Path, *, force: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a temp directory beside `target`; on success it replaces `target` (see _swap_in).

    On any error (or Ctrl-C) the temp directory is removed and `target` is left untouched.
    """
    target = Path(target)
    restore_interrupted(target.parent)
    if target.exists() and not force:
        raise RunError(f"{what} already exists: {target}. Pass --force to replace it.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as e:
        raise RunError(f"cannot write the {what} to {target}: {e.strerror or e}. Choose another place.") from None
    held = _lock_folder(tmp)
    os.chmod(tmp, 0o777 & ~_umask())  # as mkdir would make it, not mkdtemp's 0700
    try:
        yield tmp
        _swap_in(tmp, target)
    finally:
        if tmp.exists():  # the new folder after a failure, or the old one after an exchange
            shutil.rmtree(tmp, ignore_errors=True)
        if held is not None:
            os.close(held)  # closing releases the lock (and so does the process's death)


def _lock_folder(folder: Path) -> int | None:
    """An open descriptor of `folder` holding an flock on it, or None where that cannot be had (no
    fcntl, a file system without locks, another process holds it)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_abandoned(target: Path) -> None:
    """Delete the staging folders of `target` (`.NAME.XXXX.tmp`) that no process holds: a SIGKILL,
    the OOM killer or a power cut ran no clean-up, and nothing else would ever remove them. A
    folder being filled is locked by its process (staged_dir) and left alone."""
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        held = _lock_folder(tmp)
        if held is None:
            continue
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            log.info(f"Removed {tmp}: a command writing {target.name} was killed before it finished.")
        finally:
            os.close(held)


def _swap_in(tmp: Path, target: Path) -> None:
    """Put `tmp` in the place of `target` so that a kill at any moment leaves one of the two there.
    Linux swaps them in one atomic exchange (the old folder ends up at `tmp`). Elsewhere `target` is
    first renamed to a hidden `.NAME.old-PID` (a kill right then leaves it for restore_interrupted)."""
    if not target.exists():
        os.replace(tmp, target)
        return
    if _exchange(tmp, target):
        return
    old = target.with_name(f".{target.name}{_OLD}{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


_OLD = ".old-"  # the hidden name's infix, between the folder's name and the replacing process's id
_RENAME_EXCHANGE = 2  # <linux/fs.h>
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's renameat2 (glibc 2.28+, musl 1.2.2+), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or the file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    import ctypes

    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # old kernel, or not this file system
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def restore_interrupted(folder: Path) -> list[Path]:
    """Put back each folder in `folder` that a killed staged_dir left hidden as `.NAME.old-PID` with
    NAME missing; the folders restored. Called where a command looks for its folders."""
    restored = []
    with contextlib.suppress(OSError):  # no such folder, or one this user cannot change: nothing to do
        for old in sorted(Path(folder).glob(f".*{_OLD}*"), key=lambda p: p.stat().st_mtime, reverse=True):
            name, _, pid = old.name[1:].rpartition(_OLD)
            target = old.with_name(name)
            if not pid.isdigit() or _alive(int(pid)) or target.exists() or not old.is_dir():
                continue  # a process still swapping it, or the replacement is in place (a stopped clean-up)
            try:
                os.rename(old, target)
            except OSError:
                continue
            log.warning(f"Restored {target}: a command replacing it was stopped between two renames.")
            restored.append(target)
    return restored


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would end the process there; its hidden folder is left as is
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


@dataclass(frozen=True)
class BaseModelRecord:
    """The manifest's `base_model`: what the run was tuned from."""

    spec: str  # as the user named it: a built-in name, a folder, a .gguf
    path: Path  # the Hugging Face folder it resolved to
    kind: str  # builtin | folder | gguf | hub


@dataclass(frozen=True)
class TuneRecord:
    """The manifest's `tune` stage, as the later stages read it."""

    status: str  # running | interrupted | done
    config: dict  # the resolved TuneConfig (absolute paths)
    precision: str | None  # the compute precision that ran (fp32 | bf16 | fp16), recorded when training starts
    device: str | None
    metrics: dict
    nf4_double_quant: bool = True  # QLoRA's block scales quantized again (not recorded before it became a choice)
    held_out: Path | None = None  # the validation split of the training data, when one was held out and is there

    @property
    def method(self) -> str:
        return self.config.get("method", "lora")

    @property
    def data(self) -> Path | None:
        """The training data file, when it is still there."""
        return _existing(self.config.get("data"))

    @property
    def eval_file(self) -> Path | None:
        """The held-out data file, when the run has one and it is still there."""
        return _existing(self.config.get("eval_file"))

    def check_files(self) -> list[Path]:
        """Where the prompts that check this run's model come from, best first: its held-out data (the
        eval file, else the validation split), then the training data."""
        return [p for p in (self.eval_file or self.held_out, self.data) if p is not None]


def _existing(path: str | None) -> Path | None:
    return Path(path) if path and Path(path).is_file() else None


class Run:
    """A run directory: `edgeft.json` plus one folder per stage's output."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # --- layout -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.path / "merged"

    def has_merged(self) -> bool:
        """merged/ holds a finished merge: its weights, and a record of its check (the manifest's,
        or the folder's own, which a kill between the folder's rename and the manifest's write
        leaves alone). A folder with neither is a leftover that `merge` replaces."""
        if not (self.merged_dir / "config.json").is_file():
            return False
        return self.stage("merge") is not None or (self.merged_dir / MERGE_RECORD).is_file()

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def held_out_file(self) -> Path:
        return self.path / HELD_OUT

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    def export_dir(self, precision: str) -> Path:
        return self.path / f"onnx-{precision}"

    # --- lifecycle ----------------------------------------------------------------------
    @staticmethod
    def is_run(path: Path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def check_new(cls, path: Path, *, force: bool = False) -> None:
        """Fail now if `path` cannot become a new run (before any slow work is done for it)."""
        path = Path(path)
        if not path.exists():
            return
        if path.is_file():
            raise RunError(f"{path} is a file, not a run directory. Choose another --output.")
        if any(path.iterdir()):
            if not cls.is_run(path):
                raise RunError(
                    f"{path} exists and is not an edgeft run (no {MANIFEST}); refusing to touch it. Choose another --output."
                )
            if not force:
                raise RunError(
                    f"run {path} already exists. Pass --force to start it over, or --resume {path} to continue it."
                )

    @classmethod
    def create(cls, path: Path, *, force: bool = False, stages: dict | None = None, **fields: Any) -> Run:
        """Start a new run directory; an existing run is replaced only with `force`. `stages` are
        written with the manifest, in the same atomic write: a run is never seen without them."""
        path = Path(path)
        cls.check_new(path, force=force)
        try:
            if path.exists() and any(path.iterdir()):
                with cls(path).lock("tune --force"):  # refused at once while another command works on it
                    shutil.rmtree(path)
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(
                f"cannot create the run directory {path}: {e.strerror or e}. Choose another --output."
            ) from None
        run = cls(path)
        write_json_atomic(
            run.manifest_path,
            {
                "schema_version": SCHEMA_VERSION,
                "edgeft_version": __version__,
                "created_at": now(),
                **fields,
                "stages": {name: {**record, "updated_at": now()} for name, record in (stages or {}).items()},
            },
        )
        return run

    @classmethod
    def open(cls, path: Path) -> Run:
        path = Path(path)
        if not path.exists():
            raise RunError(f"run directory not found: {path}. Create one with `edgeft tune`.")
        restore_interrupted(path)
        if not cls.is_run(path):
            raise RunError(f"{path} is not an edgeft run (no {MANIFEST} in it). Create one with `edgeft tune`.")
        run = cls(path)
        manifest = run.manifest()
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise RunError(f"{run.manifest_path} has schema version {version!r}; this edgeft reads {SCHEMA_VERSION}.")
        stages = manifest.get("stages", {})
        if not isinstance(stages, dict) or not all(isinstance(s, dict) for s in stages.values()):
            raise RunError(
                f"{run.manifest_path} is damaged: 'stages' must map stage names to objects. "
                "Restore it from a backup or start the run over."
            )
        return run

    # --- manifest -----------------------------------------------------------------------
    def manifest(self) -> dict:
        return read_json(self.manifest_path, "run manifest")

    @contextlib.contextmanager
    def _manifest_held(self) -> Iterator[None]:
        """Hold the manifest for one read-modify-write: every writer (tune, merge, export, eval,
        bench, quickstart) takes it, so no update overwrites another made meanwhile. A lock of its
        own, held for milliseconds, beside the run lock a whole command holds."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks here
            yield
            return
        fd = os.open(self.path / LOCK_FILES[1], os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def update(self, **fields: Any) -> dict:
        with self._manifest_held():
            data = self.manifest()
            data.update(fields)
            write_json_atomic(self.manifest_path, data)
        return data

    def stage(self, name: str) -> dict | None:
        return self.manifest().get("stages", {}).get(name)

    def base_model(self) -> BaseModelRecord:
        b = self.manifest()["base_model"]
        return BaseModelRecord(b["spec"], Path(b["path"]), b.get("kind", "folder"))

    def tune_record(self) -> TuneRecord | None:
        """The tune stage, typed; None before `edgeft tune` recorded it."""
        r = self.stage("tune")
        if r is None:
            return None
        fields = (r.get(k, default) for k, default in (("status", "running"), ("config", {}), ("precision", None)))
        held_out = _existing(str(self.path / HELD_OUT)) if (r.get("data") or {}).get("held_out") else None
        return TuneRecord(*fields, r.get("device"), r.get("metrics", {}), r.get("nf4_double_quant", True), held_out)

    @contextlib.contextmanager
    def lock(self, what: str) -> Iterator[None]:
        """Hold the run for one command (tune, merge, export): a second command on the same run is
        refused at once, instead of both racing on the manifest and on merged/ or an export."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks here
            yield
            return
        fd = os.open(self.path / LOCK_FILES[0], os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another edgeft command"
                raise RunError(
                    f"{self.path} is busy: {holder} is working on it. Wait for it to finish, then run this again."
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"edgeft {what} (pid {os.getpid()})".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock, also when the process dies

    def record_stage(self, name: str, *, whole: bool = False, **entry: Any) -> dict:
        """Merge `entry` into the stage's record and stamp it; returns the whole stage record.
        whole=True: `entry` is the whole record (an export describes one folder: what an earlier
        export of another kind recorded, such as its GPTQ calibration, must not linger)."""
        with self._manifest_held():
            data = self.manifest()
            stages = data.setdefault("stages", {})
            record = {**({} if whole else stages.get(name, {})), **entry, "updated_at": now()}
            stages[name] = record
            write_json_atomic(self.manifest_path, data)
        return record


# Runtime LoRA adapters (`edgeft export RUN --as-adapter`): the shared base's marker and identity,
# the adapter file, and its folder in a run. Written by export, read by the runtime.
BASE_FILE = "edgeft-base.json"
ADAPTER_FILE = "adapter.onnx_adapter"
ADAPTER_FOLDER = "onnx-adapter"


def model_version(identity: str) -> int:
    """A base's identity as the adapter format's model version (a 32-bit signed integer)."""
    return int(identity[:7], 16)
