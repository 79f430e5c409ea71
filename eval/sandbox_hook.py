"""The audit hook of the code sandbox: the in-process layer (the OS layer is eval/sandbox_os.py).

Standard library only; eval/_sandbox_child.py loads this file by path and installs ``build_hook(...)`` before any
sample code runs. The sample shares the interpreter with the hook, so the hook is written so that the sample cannot
change what it does:

- every name the hook and its two helpers use is a default argument bound at build time (C functions, frozensets,
  strings): no globals, no closures (``tests/test_eval_sandbox_attacks.py`` checks the bytecode), so patching
  ``os``, ``posixpath`` or builtins changes nothing here, and replacing the helpers' defaults or code is refused;
- paths are copied to exact ``str`` before they are checked (a ``str`` subclass cannot lie about its value; the
  os-level events receive paths already converted by CPython, so ``__fspath__`` cannot answer twice);
- symlinks are resolved with ``os.lstat``/``os.readlink`` captured at build time.

What it refuses: new processes and exec (fork, spawn, system, subprocess, ``_posixsubprocess``), ctypes and the
test/sub-interpreter C modules, sockets, signals to other processes, raising rlimits, new audit hooks, trace and
profile functions, other threads' frames (``sys._current_frames``) and gc's object walks, building code objects or
unmarshalling bytecode, changing the hook's helper functions, any audited event in the verdict thread, writes,
deletes, renames, mode changes outside the working directory, reads outside the working directory and the read-only
view (the interpreter's library and the shared libraries), directory descriptors and ``chdir`` outside the working
directory, and ``dir_fd`` arguments whose descriptor is not inside the working directory.
"""

from __future__ import annotations

import _thread
import os
from collections.abc import Callable

DEV_NODES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")

BLOCKED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.posix_spawn", "os.posix_spawnp", "os.spawn", "os.exec", "os.system",
    "os.startfile", "subprocess.Popen", "pty.spawn", "os.killpg", "signal.pthread_kill", "os.pidfd_open",
    "resource.setrlimit", "resource.prlimit", "os.setns", "os.unshare", "sys.remote_exec",
    "socket.__new__", "socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.gethostbyname_ex", "socket.getnameinfo",
    "sys.addaudithook", "sys._current_frames", "sys.settrace", "sys.setprofile",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "code.__new__", "marshal.load", "marshal.loads", "cpython.PyInterpreterState_New",
    "sqlite3.enable_load_extension", "sqlite3.load_extension",
})
BLOCKED_IMPORTS = frozenset({
    "ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels", "_testcapi",
    "_testinternalcapi", "_testbuffer", "_testmultiphase", "_testimportmultiple", "_testsinglephase",
    "_xxtestfuzz", "_testclinic",
})
# one path that is written / changed (first argument), with the position of a dir_fd argument (or -1)
WRITE_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "os.chmod": 2, "os.chown": 3, "os.utime": 3,
                "os.truncate": -1, "os.setxattr": -1, "os.removexattr": -1, "os.chflags": -1, "os.lchflags": -1,
                "shutil.rmtree": 1, "os.mkfifo": -1, "os.mknod": -1, "shutil.chown": -1,
                "shutil.make_archive": -1, "sqlite3.connect": -1}
TWO_PATH_EVENTS = {"os.rename": (2, 3), "os.link": (2, 3), "os.symlink": (2, -1), "shutil.copyfile": (-1, -1),
                   "shutil.copymode": (-1, -1), "shutil.copystat": (-1, -1), "shutil.copytree": (-1, -1),
                   "shutil.move": (-1, -1), "shutil.unpack_archive": (-1, -1)}
READ_EVENTS = frozenset({"os.listdir", "os.scandir"})


class _Refused(PermissionError):
    pass


def build_hook(workdir: str, read_roots: tuple[str, ...] | list[str], helper_ident: int | None = None,
               workdir_dev: int = -1) -> Callable[[str, tuple], None]:
    """The hook for a sandbox whose working directory is ``workdir`` (already resolved); reads are allowed under
    ``read_roots`` too. ``helper_ident``: the verdict thread, in which every audited event is refused.
    ``workdir_dev``: st_dev of the working directory when it is its own file system (a tmpfs), else -1."""
    workdir = os.path.realpath(workdir)
    roots = tuple(dict.fromkeys([workdir, *[os.path.realpath(r) for r in read_roots],
                                 *[os.path.abspath(r) for r in read_roots]]))
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    dir_flags = os.O_DIRECTORY | getattr(os, "O_PATH", 0)

    def norm(p, _type=type, _str=str, _bytes=bytes, _isinstance=isinstance, _join=str.join,
             _decode=bytes.decode, _refused=_Refused, _fspath=os.fspath):
        """An exact str path (copied from str/bytes and their subclasses). os.PathLike objects reach the hook only
        through Python-level events (shutil's), whose os calls are audited again with the converted path."""
        t = _type(p)
        if t is _str:
            return p
        if t is _bytes:
            return _decode(p, "utf-8", "surrogateescape")
        if _isinstance(p, _str):
            return _join("", (p,))
        if _isinstance(p, _bytes):
            return _decode(_bytes(p), "utf-8", "surrogateescape")
        q = _fspath(p)
        if _isinstance(q, _str):
            return _join("", (q,))
        if _isinstance(q, _bytes):
            return _decode(_bytes(q), "utf-8", "surrogateescape")
        raise _refused("sandbox: file paths must be str or bytes here")

    def resolve(path, base=None, _getcwd=os.getcwd, _lstat=os.lstat, _readlink=os.readlink, _len=len,
                _ifmt=0o170000, _iflnk=0o120000, _oserror=OSError, _refused=_Refused, _reversed=reversed,
                _list=list, _join=str.join):
        """Absolute path with '.', '..' and symlinks resolved (missing components kept literally)."""
        if not path.startswith("/"):
            path = (base if base is not None else _getcwd()) + "/" + path
        todo = _list(_reversed(path.split("/")))
        out = []
        links = 0
        while todo:
            c = todo.pop()
            if c == "" or c == ".":
                continue
            if c == "..":
                if out:
                    out.pop()
                continue
            cand = "/" + _join("/", out + [c])
            try:
                st = _lstat(cand)
            except _oserror:
                out.append(c)
                continue
            if st.st_mode & _ifmt == _iflnk:
                links += 1
                if links > 40:
                    raise _refused("sandbox: too many symbolic links")
                target = _readlink(cand)
                if target.startswith("/"):
                    out = []
                todo.extend(_reversed(target.split("/")))
                continue
            out.append(c)
        return "/" + _join("/", out)

    def fd_inside(fd, _dev=workdir_dev, _workdir=workdir, _fstat=os.fstat, _readlink=os.readlink, _str=str,
                  _oserror=OSError):
        """Whether an open descriptor lies in the working directory: on its own file system (namespaces: a tmpfs),
        else by the kernel's name for it in /proc/self/fd."""
        try:
            if _dev >= 0:
                return _fstat(fd).st_dev == _dev
            target = _readlink("/proc/self/fd/" + _str(fd))
        except _oserror:
            return False
        return target == _workdir or target.startswith(_workdir + "/")

    writes, twos, me = tuple(WRITE_EVENTS.items()), tuple(TWO_PATH_EVENTS.items()), os.getpid()

    def hook(event, args, _workdir=workdir, _roots=roots, _devs=frozenset(DEV_NODES), _helper=helper_ident,
             _ident=_thread.get_ident, _blocked=BLOCKED_EVENTS, _imports=BLOCKED_IMPORTS,
             _writes=writes, _write_names=frozenset(WRITE_EVENTS),
             _twos=twos, _two_names=frozenset(TWO_PATH_EVENTS), _reads=READ_EVENTS,
             _norm=norm, _resolve=resolve, _type=type, _int=int, _str=str, _len=len, _stat=os.stat,
             _fstat=os.fstat, _wflags=write_flags, _dflags=dir_flags, _ifmt=0o170000, _ifdir=0o040000,
             _dev=workdir_dev, _me=me, _oserror=OSError, _refused=_Refused, _isinstance=isinstance,
             _add=int.__add__, _rfind=str.rfind, _fd_inside=fd_inside):
        if _helper is not None and _ident() == _helper:
            raise _refused("sandbox: nothing is allowed in the verdict thread")
        if event in _blocked or event.startswith("ctypes."):
            raise _refused("sandbox: " + event + " is not allowed")
        if event == "import":
            if args and args[0] is not None and _norm(args[0]) in _imports:
                raise _refused("sandbox: importing " + _norm(args[0]) + " is not allowed")
            return
        if event == "object.__setattr__" or event == "object.__delattr__":
            if args and (args[0] is _norm or args[0] is _resolve or args[0] is _fd_inside):
                raise _refused("sandbox: changing the sandbox's functions is not allowed")
            return
        if event == "os.kill":
            if args and _isinstance(args[0], _int) and _add(args[0], 0) not in (_me, 0):
                raise _refused("sandbox: signalling other processes is not allowed")
            return
        if event == "open":
            path = args[0] if args else None
            if path is None or _isinstance(path, _int):
                return  # an already-open descriptor
            mode = args[1] if _len(args) > 1 else None
            flags = args[2] if _len(args) > 2 else None
            flags = _add(flags, 0) if _isinstance(flags, _int) else 0
            writing = (flags & _wflags) != 0
            if mode is not None:
                m = _norm(mode)
                writing = writing or "w" in m or "a" in m or "x" in m or "+" in m
            full = _resolve(_norm(path))
            inside = full == _workdir or full.startswith(_workdir + "/")
            if full in _devs:
                return
            if writing and not inside:
                raise _refused("sandbox: writing " + full + " (outside the working directory) is not allowed")
            if not inside:
                ok = False
                for r in _roots:
                    if full == r or full.startswith(r + "/"):
                        ok = True
                        break
                if not ok:
                    raise _refused("sandbox: reading " + full + " (outside the sandbox's view) is not allowed")
                is_dir = (flags & _dflags) != 0
                if not is_dir:
                    try:
                        is_dir = _stat(full).st_mode & _ifmt == _ifdir
                    except _oserror:
                        is_dir = False
                if is_dir:
                    raise _refused("sandbox: opening the directory " + full + " is not allowed")
            return
        if event == "os.chdir":
            if args and _isinstance(args[0], _int):
                if not _fd_inside(_add(args[0], 0)):
                    raise _refused("sandbox: fchdir outside the working directory is not allowed")
                return
            full = _resolve(_norm(args[0]))
            if not (full == _workdir or full.startswith(_workdir + "/")):
                raise _refused("sandbox: chdir to " + full + " (outside the working directory) is not allowed")
            return
        if event in _reads:
            p = args[0] if args else None
            if p is None or _isinstance(p, _int):
                return
            full = _resolve(_norm(p))
            if full == _workdir or full.startswith(_workdir + "/"):
                return
            for r in _roots:
                if full == r or full.startswith(r + "/"):
                    return
            raise _refused("sandbox: listing " + full + " (outside the sandbox's view) is not allowed")
        if event in _write_names:
            pos = -1
            for name, p in _writes:
                if name == event:
                    pos = p
                    break
            dir_fd = args[pos] if 0 <= pos < _len(args) else None
            if dir_fd == -1:  # CPython passes -1 for "no dir_fd"
                dir_fd = None
            p = args[0] if args else None
            if event == "shutil.unpack_archive" or event == "shutil.make_archive":
                p = args[0] if event == "shutil.make_archive" else (args[1] if _len(args) > 1 else None)
            if event == "sqlite3.connect" and _isinstance(p, _str) and (p == ":memory:" or p == ""):
                return
            if p is None:
                return
            if _isinstance(p, _int):
                if not _fd_inside(_add(p, 0)):
                    raise _refused("sandbox: " + event + " on a descriptor is not allowed")
                return
            path = _norm(p)
            if dir_fd is not None:
                if not _isinstance(dir_fd, _int) or not _fd_inside(_add(dir_fd, 0)):
                    raise _refused("sandbox: " + event + " with a dir_fd outside the working directory")
                if not path.startswith("/"):
                    if _dev >= 0 or ".." not in path.split("/"):
                        return  # relative to a directory inside the working directory
                    raise _refused("sandbox: '..' with dir_fd is not allowed")
            full = _resolve(path)
            if not (full == _workdir or full.startswith(_workdir + "/")):
                raise _refused("sandbox: " + event + " on " + full + " (outside the working directory)")
            return
        if event in _two_names:
            fds = (-1, -1)
            for name, f in _twos:
                if name == event:
                    fds = f
                    break
            for pos in fds:
                if 0 <= pos < _len(args) and args[pos] is not None and args[pos] != -1:
                    raise _refused("sandbox: " + event + " with dir_fd is not allowed")
            paths = []
            for i in (0, 1):
                if i < _len(args) and args[i] is not None and not _isinstance(args[i], _int):
                    paths.append(_norm(args[i]))
                elif i < _len(args) and _isinstance(args[i], _int):
                    raise _refused("sandbox: " + event + " on a descriptor is not allowed")
            if event == "os.symlink" and _len(paths) == 2:
                dst = _resolve(paths[1])
                cut = _rfind(dst, "/")
                paths = [_resolve(paths[0], dst[:cut] if cut > 0 else "/"), dst]
            for p in paths:
                full = _resolve(p)
                if not (full == _workdir or full.startswith(_workdir + "/")):
                    raise _refused("sandbox: " + event + " on " + full + " (outside the working directory)")
            return

    return hook
