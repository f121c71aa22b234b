"""A fake of the Modal that modal_app.py uses: Modal's documented semantics, modelled without a network.

- Volume (modal/volume.py): the server state is a folder (a new version per commit, swapped in at once). A container
  mounts a copy and sees it plus its own writes; `commit()` publishes the files it changed or deleted since its mount
  (last write wins per file), then reloads; a reload replaces the view with the server state and FAILS while a
  process of the container has a file under the mount open (a descriptor, a memory map, or its working directory).
  On this machine, `listdir`, `read_file` and `batch_upload` read and write the server state.
- Dict (modal/dict.py): a folder with one file per key; `put(skip_if_exists=True)` is an atomic create.
- Functions: `spawn()` starts the call. Each attempt runs in a fresh container, a real subprocess (`python
  tests/fake_modal.py SPEC.json`) that mounts the volumes, imports the function's module with its Modal objects
  replaced by these fakes and its roots (TINY_CATS_*_ROOT) at its own copy, and calls the function's body. A raised
  exception, a container that died and an exceeded timeout are retried in a fresh container with a fresh timeout,
  up to the function's max_retries (read from the real decorated function); a preemption (SIGINT, then SIGKILL
  after a grace period) or a KeyboardInterrupt leaving the function reruns the input without spending a retry.
  Calls of one pool (a function, or one with_options variant of it) use at most max_containers containers at once.
  When a container ends, every process it started ends with it.
A test can shorten the retries or the timeout, inject a fault into each container (`inject`), and preempt the
container for which a condition holds (`preempt_when`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import modal
from modal.exception import FunctionTimeoutError, NotFoundError
from modal.types import FileEntry, FileEntryType

ROOT_ENV = {"/data": "TINY_CATS_DATA_ROOT", "/outputs": "TINY_CATS_OUTPUT_ROOT"}  # modal_app's mounts
CONTAINER_ENV = "FAKE_MODAL_CONTAINER"  # marks every process of a container, so that its end can end them all
PROJECT_DIR = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# Volumes and the Dict
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """The server's lock on one volume or dict: a commit, a mount or an upload is one step for the others."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def digests(root: Path) -> dict[str, str]:
    """What a folder holds: each file's content digest, and "/" for each folder."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "/"
        for path in root.rglob("*")
    }


def copy_tree(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


class ServerVolume:
    """A volume as this machine sees it: the committed state (`modal.Volume.from_name` outside a container).

    The state is a folder `current`, a link to its newest version: a commit or an upload writes a new version and
    swaps the link, so that it is all or nothing, even when the container is killed halfway.
    """

    def __init__(self, name: str, base: Path):
        self.name, self.base, self.root = name, base, base / "current"
        with locked(base):
            if not self.root.exists():
                (base / "v0").mkdir()
                os.symlink("v0", self.root)

    @contextlib.contextmanager
    def new_version(self) -> Iterator[Path]:
        with locked(self.base):
            old, version = self.root.resolve(), self.base / f"v{time.time_ns()}"
            shutil.copytree(old, version)
            yield version
            os.symlink(version.name, self.base / "next")
            os.replace(self.base / "next", self.root)
            shutil.rmtree(old)

    def listdir(self, path: str, recursive: bool = False) -> list[FileEntry]:
        folder = self.root / path.lstrip("/")
        if not folder.exists():
            raise NotFoundError(f"no such file or directory: {path}")
        paths = sorted(folder.rglob("*") if recursive else folder.iterdir())
        kind = {True: FileEntryType.FILE, False: FileEntryType.DIRECTORY}
        return [FileEntry(p.relative_to(self.root).as_posix(), kind[p.is_file()], 0, 0) for p in paths]

    def read_file(self, path: str) -> Iterator[bytes]:
        data = (self.root / path.lstrip("/")).read_bytes()  # FileNotFoundError, as modal 1.6 raises
        yield from (data[:3], data[3:])  # in chunks, as Modal sends them

    @contextlib.contextmanager
    def batch_upload(self, force: bool = False) -> Iterator[Any]:
        volume = self

        class Batch:
            def put_directory(self, local_path: str, remote_path: str) -> None:
                with volume.new_version() as version:
                    shutil.copytree(local_path, version / remote_path.lstrip("/"), dirs_exist_ok=force)

        yield Batch()


class MountedVolume:
    """A volume as a container sees it: its view (the state at mount or last reload, plus its own writes)."""

    def __init__(self, server: ServerVolume, view: Path):
        self.server, self.view, self.name = server, view, server.name
        self.reload()

    def commit(self) -> None:
        """Publish what this container changed or deleted since its snapshot (last write wins), then reload."""
        now = digests(self.view)
        with self.server.new_version() as version:
            for path, digest in sorted(now.items()):
                if self.snapshot.get(path) != digest and digest == "/":
                    (version / path).mkdir(parents=True, exist_ok=True)
                elif self.snapshot.get(path) != digest:
                    (version / path).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(self.view / path, version / path)
            for path in sorted(self.snapshot.keys() - now.keys(), reverse=True):
                with contextlib.suppress(OSError):  # a folder another container filled meanwhile stays
                    (version / path).rmdir() if self.snapshot[path] == "/" else (version / path).unlink(missing_ok=True)
        self.reload()

    def reload(self) -> None:
        if hasattr(self, "snapshot") and (busy := open_paths(self.view)):
            raise RuntimeError(f"there are open files preventing the operation: path {busy[0]} is open")
        with locked(self.server.base):
            copy_tree(self.server.root.resolve(), self.view)
            self.snapshot = digests(self.view)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree = [pid]
    for parent in tree:
        tree.extend(children.get(parent, []))
    return tree


def open_paths(root: Path) -> list[str]:
    """Paths under `root` that a process of this container holds open (descriptor, memory map or working dir)."""
    found = []
    for pid in process_tree(os.getpid()):
        proc = Path(f"/proc/{pid}")
        with contextlib.suppress(OSError):
            held = [os.readlink(fd) for fd in (proc / "fd").iterdir() if fd.is_symlink()]
            held += [line.split(maxsplit=5)[5] for line in (proc / "maps").read_text().splitlines() if "/" in line]
            held.append(os.readlink(proc / "cwd"))
            found += [path for path in held if path == str(root) or path.startswith(f"{root}/")]
    return found


class FakeDict:
    """modal.Dict: a folder with one JSON file per key."""

    def __init__(self, name: str, root: Path):
        self.name, self.root = name, root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / urllib.parse.quote(key, safe="")

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return json.loads(self._path(key).read_text())
        except FileNotFoundError:
            return default

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        tmp = self.root / f".{os.getpid()}-{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps(value))
        try:
            if skip_if_exists:
                os.link(tmp, self._path(key))  # fails if the key exists: an atomic create
            else:
                os.replace(tmp, self._path(key))
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def pop(self, key: str, default: Any = None) -> Any:
        value = self.get(key, default)
        self._path(key).unlink(missing_ok=True)
        return value


# ---------------------------------------------------------------------------------------------------------
# Functions, calls and containers (on this machine)
# ---------------------------------------------------------------------------------------------------------
class FakeModal:
    """The server: volumes, dicts, and every container it started. `install(module)` replaces the module's Modal
    objects by fakes on this machine; a container's driver does the same in the container."""

    def __init__(self, root: Path, grace_s: float = 30.0):
        self.root, self.grace_s = root, grace_s
        self.containers: list[Container] = []
        self.triggers: list[tuple[Callable[[Container], bool], float]] = []
        self.max_retries: int | None = None  # a test's smaller retry budget; None: the function's own
        self.inject: str | None = None  # "module:function", called in each container with its attempt number
        self.timeout_s: float | None = None  # a test's shorter timeout; None: the function's own
        self.pools: dict[str, threading.Semaphore] = {}
        self.closed = False
        self._lock = threading.Lock()

    def volume(self, name: str) -> ServerVolume:
        return ServerVolume(name, self.root / "volumes" / name)

    def dict(self, name: str) -> FakeDict:
        return FakeDict(name, self.root / "dicts" / name)

    def install(self, module: Any, monkeypatch: Any) -> None:
        for attr, value in list(vars(module).items()):
            if isinstance(value, modal.Volume):
                monkeypatch.setattr(module, attr, self.volume(value.name))
            elif isinstance(value, modal.Dict):
                monkeypatch.setattr(module, attr, self.dict(value.name))
            elif isinstance(value, modal.Function):
                info = value.info()
                options = {"timeout": info.timeout, "retries": info.max_retries, "volumes": dict(info.volumes)}
                monkeypatch.setattr(module, attr, FakeFunction(self, module.__name__, attr, options))

    def close(self) -> None:
        """End every container still running (a test that stopped early leaves none behind)."""
        self.closed = True
        for container in self.containers:
            container.end()

    def preempt_when(self, condition: Callable[[Container], bool], grace_s: float | None = None) -> None:
        """Preempt the first running container for which `condition(container)` holds (once)."""
        self.triggers.append((condition, self.grace_s if grace_s is None else grace_s))

    def pool(self, key: str, size: int | None) -> Any:
        with self._lock:
            if size and key not in self.pools:
                self.pools[key] = threading.Semaphore(size)
        return self.pools.get(key) or contextlib.nullcontext()


class FakeFunction:
    def __init__(self, fake: FakeModal, module: str, name: str, options: dict[str, Any]):
        self.fake, self.module, self.name, self.options = fake, module, name, options

    def with_options(self, **options: Any) -> FakeFunction:
        return FakeFunction(self.fake, self.module, self.name, {**self.options, "variant": True, **options})

    def spawn(self, *args: Any) -> FakeCall:
        return FakeCall(self, args)

    def remote(self, *args: Any) -> Any:
        return self.spawn(*args).get()


class FakeCall:
    """One input: its attempts run in a thread from spawn() on; get() waits for the value or the last error."""

    count = 0

    def __init__(self, function: FakeFunction, args: tuple):
        FakeCall.count += 1
        self.function, self.args, self.object_id = function, args, f"fc-{FakeCall.count}"
        self.containers: list[Container] = []
        self.value: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def get(self, timeout: float | None = None) -> Any:
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.value

    def _run(self) -> None:
        try:
            self._attempts()
        except BaseException as error:  # a fault of the fake itself: get() raises it
            self.error = error

    def _attempts(self) -> None:
        fake, options = self.function.fake, self.function.options
        retries_left = options["retries"] if fake.max_retries is None else fake.max_retries
        shared = {k: v for k, v in options.items() if k not in ("retries", "timeout", "secrets")}
        pool = fake.pool(
            f"{self.function.name} {json.dumps(shared, sort_keys=True, default=str)}", options.get("max_containers")
        )
        while not fake.closed:
            with pool:
                container = Container(self, len(self.containers) + 1)
                self.containers.append(container)
                result = container.run(fake.timeout_s or options["timeout"])
            if "value" in result:
                self.value = result["value"]
                return
            if result.get("interrupted") or container.preempted:
                continue  # Modal reschedules the input: no retry spent
            if retries_left == 0:
                self.error = result_error(result)
                return
            retries_left -= 1


def result_error(result: dict[str, Any]) -> BaseException:
    """The exception get() raises: the function's own (as Modal deserializes it) or Modal's for a timeout."""
    if result.get("timeout"):
        return FunctionTimeoutError(f"the function's timeout of {result['timeout']} s was exceeded")
    module, name, message = result.get("error") or ("builtins", "RuntimeError", "the container died")
    error_class = getattr(importlib.import_module(module), name, None)
    is_exception = isinstance(error_class, type) and issubclass(error_class, Exception)
    return error_class(message) if is_exception else RuntimeError(f"{module}.{name}: {message}")


class Container:
    """One fresh container for one attempt of a call: a subprocess with its own views of the volumes."""

    def __init__(self, call: FakeCall, number: int):
        self.call, self.number, self.preempted = call, number, False
        self.dir = call.function.fake.root / "containers" / f"{call.object_id}-{number}"
        self.started = self.ended = 0.0
        call.function.fake.containers.append(self)

    def mount(self, path: str) -> Path:
        return self.dir / "mnt" / path.strip("/")

    def run(self, timeout_s: float) -> dict[str, Any]:
        fake, function = self.call.function.fake, self.call.function
        self.dir.mkdir(parents=True)
        mounts = {path: info.name for path, info in function.options["volumes"].items()}
        spec = {
            "module": function.module,
            "function": function.name,
            "args": list(self.call.args),
            "server": str(fake.root),
            "mounts": mounts,
            "call_id": self.call.object_id,
            "inject": fake.inject,
            "attempt": self.number,
        }
        (self.dir / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, **(function.options.get("env") or {}), CONTAINER_ENV: str(self.dir)}
        env.update(
            {ROOT_ENV[path]: str(self.mount(path)) for path in mounts}, TINY_CATS_LOCAL_ROOT=str(self.dir / "local")
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(PROJECT_DIR), os.environ.get("PYTHONPATH"))))
        self.started, deadline, kill_at, timed_out = time.monotonic(), time.monotonic() + timeout_s, None, False
        with open(self.dir / "log.txt", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, __file__, str(self.dir / "spec.json")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_DIR,
                start_new_session=True,
            )
            while process.poll() is None:
                now = time.monotonic()
                for trigger in [t for t in fake.triggers if not self.preempted and t[0](self)]:
                    fake.triggers.remove(trigger)
                    self.preempted, kill_at = True, now + trigger[1]
                    process.send_signal(signal.SIGINT)
                timed_out = now > deadline
                if timed_out or (kill_at is not None and now > kill_at):
                    break
                time.sleep(0.02)
        self.end()
        self.ended = time.monotonic()
        if timed_out:
            return {"timeout": timeout_s}
        with contextlib.suppress(OSError):
            return json.loads((self.dir / "result.json").read_text())
        return {}  # killed: no result

    def end(self) -> None:
        """The container's end ends every process in it (the launcher of several GPUs has its own session)."""
        for _ in range(50):
            pids = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/environ") if self._holds(p)]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def _holds(self, environ: Path) -> bool:
        with contextlib.suppress(OSError):
            return f"{CONTAINER_ENV}={self.dir}".encode() in environ.read_bytes().split(b"\0")
        return False

    def log(self) -> str:
        return (self.dir / "log.txt").read_text(errors="replace")

    def overlaps(self, other: Container) -> bool:
        return self.started < other.ended and other.started < self.ended


# ---------------------------------------------------------------------------------------------------------
# Inside a container
# ---------------------------------------------------------------------------------------------------------
def probe(plan: list[str], runs: str) -> int:
    """A function to test this fake with: its n-th run does plan[n] (return n, raise, interrupt, nap 1.5 s, sleep
    past any timeout, or sleep deaf to SIGINT), and leaves a mark in the folder `runs`."""
    number = len(list(Path(runs).glob("*")))
    Path(runs, str(number)).touch()
    if plan[number] == "raise":
        raise ValueError(f"run {number} failed")
    if plan[number] == "interrupt":
        raise KeyboardInterrupt
    if plan[number] == "deaf":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if plan[number] in ("sleep", "deaf"):
        time.sleep(120)
    if plan[number] == "nap":
        time.sleep(1.5)
    return number


def container_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    server = Path(spec["server"])
    mounted = {
        name: MountedVolume(ServerVolume(name, server / "volumes" / name), Path(os.environ[ROOT_ENV[path]]))
        for path, name in spec["mounts"].items()
    }
    module = importlib.import_module(spec["module"])
    for attr, value in list(vars(module).items()):
        if isinstance(value, modal.Volume):
            setattr(module, attr, mounted.get(value.name) or ServerVolume(value.name, server / "volumes" / value.name))
        elif isinstance(value, modal.Dict):
            setattr(module, attr, FakeDict(value.name, server / "dicts" / value.name))
    modal.current_function_call_id = lambda: spec["call_id"]
    if spec["inject"]:  # a test's fault, set up inside the container
        target, _, function = spec["inject"].partition(":")
        getattr(importlib.import_module(target), function)(spec["attempt"])
    result: dict[str, Any]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "executing locally": the mounts are these fakes
            function = getattr(module, spec["function"])
            result = {"value": getattr(function, "local", function)(*spec["args"])}
    except KeyboardInterrupt:
        result = {"interrupted": True}
    except BaseException as error:  # noqa: BLE001 — the function's failure, reported as Modal reports it
        traceback.print_exc()
        result = {"error": [type(error).__module__, type(error).__qualname__, str(error)]}
    tmp = Path(spec_path).with_name("result.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, Path(spec_path).with_name("result.json"))


if __name__ == "__main__":
    container_main(sys.argv[1])
