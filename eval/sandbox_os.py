"""The sandbox launcher: OS-level containment for one code sample, then ``execve`` of the runner.

Run by eval/sandbox.py as ``python -I -S -B sandbox_os.py CONFIG_JSON`` (standard library only). It uses ctypes
for the system calls Python 3.11 lacks, which is why it is a separate process: the runner
(eval/_sandbox_child.py) starts as a fresh interpreter by ``execve`` and never loads ctypes (ctypes' classes would
stay reachable through ``object.__subclasses__()`` and let a sample read memory without an audited call).

``isolate()`` puts the launcher into fresh namespaces (user, mount, PID, network, IPC, UTS) with a private root file
system that shows only the interpreter binary, its standard library, the shared libraries it loads, a few device
nodes and an empty size-limited tmpfs at ``/sandbox`` (the working directory; no /proc, /sys, /etc, /tmp or /home),
then drops every capability. It continues in a process that is PID 2 of the new PID namespace; the processes above
it only wait and relay the exit status, so killing the top process (the one the harness started) kills the
namespace's init through ``PR_SET_PDEATHSIG``, and the kernel then kills everything left in the namespace, including
children that called ``setsid`` or were re-parented.

``guard_process()`` then sets no-new-privileges and a seccomp filter (inherited by the runner across ``execve``)
that refuses new processes (fork, vfork, clone without CLONE_THREAD), ptrace and cross-process memory access,
namespace and mount calls, kernel keyrings, BPF, io_uring, and sockets other than AF_UNIX. ``execve`` itself stays
allowed (the launcher needs it once); the runner's audit hook refuses every Python path to it, and with fork refused
an exec can only replace the sample's own process.

As root (this project's CI), the mount namespace is created while still privileged and the user namespace after
it, so the sample's namespace owns no mount and its uid maps to an unprivileged host uid (65534). As another user,
the user namespace comes first and maps the user's own uid.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_CAPBSET_DROP = 1, 4, 22, 24
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
SECCOMP_MODE_FILTER = 2

SANDBOX_DIR = "/sandbox"  # the working directory inside the private root
HOST_UID = 65534  # what the sample's uid is on the host when the harness runs as root ("nobody")
DEV_NODES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


class IsolationError(RuntimeError):
    pass


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _check(ret: int, what: str) -> int:
    if ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def _unshare(flags: int) -> None:
    _check(_libc().unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(_libc().mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {src} -> {target}")


def _prctl(option: int, arg: int = 0) -> int:
    return _libc().prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                         ctypes.c_ulong(0))


# ---------------------------------------------------------------------------------------------- what is visible
def _multiarch() -> str:
    return getattr(sys.implementation, "_multiarch", "") or ""


def default_view(site_packages: bool = False) -> tuple[list[str], list[str]]:
    """(library directories mounted read-only with exec allowed, other read-only directories): the interpreter's
    sys.path entries (its standard library; site-packages only when asked), the directories of the shared objects
    this process has mapped (libpython, libc), and the multiarch library directories that extension modules'
    dependencies live in. Nothing else of the host is visible."""
    lib_dirs: list[str] = []
    plain: list[str] = []

    def add(lst: list[str], p: str) -> None:
        if p and os.path.isdir(p) and p not in lst:
            lst.append(p)

    for p in sys.path:
        if not p or not os.path.isabs(p):
            continue
        if "site-packages" in p or "dist-packages" in p:
            if site_packages:
                add(lib_dirs, p)
            continue
        if p.endswith("lib-dynload"):
            add(lib_dirs, p)
        else:
            add(plain, p)
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and ".so" in parts[5]:
                    add(lib_dirs, os.path.dirname(parts[5].strip()))
    except OSError:
        pass
    arch = _multiarch()
    for base in ("/lib", "/usr/lib", "/lib64", "/usr/lib64"):
        add(lib_dirs, os.path.join(base, arch) if arch else base)
    return lib_dirs, plain


def elf_interpreter(path: str) -> str | None:
    """The PT_INTERP path of a 64-bit little-endian ELF executable (the dynamic loader execve needs), if any."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None
            phoff, = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                ph = f.read(phentsize)
                if struct.unpack_from("<I", ph, 0)[0] == 3:  # PT_INTERP
                    off, = struct.unpack_from("<Q", ph, 8)
                    size, = struct.unpack_from("<Q", ph, 32)
                    f.seek(off)
                    return f.read(size).split(b"\0", 1)[0].decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


def view_roots(lib_dirs: list[str], plain: list[str]) -> list[str]:
    """Every path under which the sample may read (both spellings: as given and resolved)."""
    out: list[str] = []
    for p in [*lib_dirs, *plain]:
        for q in (os.path.abspath(p), os.path.realpath(p)):
            if q not in out:
                out.append(q)
    return out


def _locked_flags(path: str) -> int:
    """Mount flags of ``path``'s mount that a bind remount must keep (the kernel refuses to clear them)."""
    try:
        f = os.statvfs(path).f_flag
    except OSError:
        return 0
    out = 0
    for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                   (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
                   (getattr(os, "ST_RELATIME", 4096), MS_RELATIME)):
        if f & st:
            out |= ms
    return out


def _bind(src: str, newroot: str, target: str, flags: int, is_file: bool = False) -> None:
    dest = newroot + target
    if is_file:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if not os.path.exists(dest):
            with open(dest, "w"):
                pass
    else:
        os.makedirs(dest, exist_ok=True)
    _mount(src, dest, None, MS_BIND | MS_REC)
    _mount(None, dest, None, MS_BIND | MS_REMOUNT | flags | _locked_flags(src))


def _build_root(newroot: str, lib_dirs: list[str], plain: list[str], exec_files: list[str], size_mb: int) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", newroot, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    binds: dict[str, tuple[str, int]] = {}
    for group, flags in ((plain, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC),
                         (lib_dirs, MS_RDONLY | MS_NOSUID | MS_NODEV)):
        for p in group:
            src = os.path.realpath(p)
            for target in (os.path.abspath(p), src):
                binds[target] = (src, flags)
    for target in sorted(binds, key=lambda t: t.count("/")):  # parents first: a later bind must not hide one
        _bind(binds[target][0], newroot, target, binds[target][1])
    for f in exec_files:  # the runner's interpreter binary and its dynamic loader, at the paths execve uses
        for path in dict.fromkeys((os.path.abspath(f), os.path.realpath(f))):
            _bind(os.path.realpath(f), newroot, path, MS_RDONLY | MS_NOSUID | MS_NODEV, is_file=True)
    for node in DEV_NODES:
        if os.path.exists(node):
            _bind(node, newroot, node, MS_NOSUID | MS_NOEXEC, is_file=True)
    if os.path.isfile("/etc/ld.so.cache"):  # where dlopen finds extension modules' libraries
        _bind("/etc/ld.so.cache", newroot, "/etc/ld.so.cache", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
              is_file=True)
    work = newroot + SANDBOX_DIR
    os.makedirs(work, exist_ok=True)
    _mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
           f"size={int(size_mb)}m,nr_inodes=16384,mode=0777")
    old = newroot + "/.old"
    os.makedirs(old, exist_ok=True)
    os.chdir(newroot)
    nr = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)
    if nr is None:
        raise IsolationError(f"pivot_root: unknown syscall number on {os.uname().machine}")
    _check(_libc().syscall(ctypes.c_long(nr), b".", b".old"), "pivot_root")
    os.chdir("/")
    _check(_libc().umount2(b"/.old", ctypes.c_int(MNT_DETACH)), "umount old root")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(SANDBOX_DIR)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _self_map(uid: int, gid: int) -> None:
    try:
        _write("/proc/self/setgroups", "deny")
    except OSError:
        pass
    _write("/proc/self/uid_map", f"0 {uid} 1\n")
    _write("/proc/self/gid_map", f"0 {gid} 1\n")


def _drop_capabilities() -> None:
    for cap in range(64):
        if _prctl(PR_CAPBSET_DROP, cap) != 0 and ctypes.get_errno() == errno.EINVAL:
            break
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    hdr = Header(0x20080522, 0)
    data = (Data * 2)()
    _check(_libc().capset(ctypes.byref(hdr), data), "capset")


def _map_helper(target_pid: int) -> tuple[int, int, int]:
    """Fork a helper that stays in the host's user namespace and, when asked, maps the target's namespace root
    to HOST_UID (only a process outside the new namespace may map a uid other than its own)."""
    req_r, req_w = os.pipe()
    ack_r, ack_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(req_w)
            os.close(ack_r)
            ok = b"n"
            if os.read(req_r, 1) == b"m":
                try:
                    _write(f"/proc/{target_pid}/uid_map", f"0 {HOST_UID} 1\n")
                    _write(f"/proc/{target_pid}/gid_map", f"0 {HOST_UID} 1\n")
                    ok = b"y"
                except OSError:
                    pass
            os.write(ack_w, ok)
        finally:
            os._exit(0)
    os.close(req_r)
    os.close(ack_w)
    return pid, req_w, ack_r


def isolate(newroot: str, lib_dirs: list[str], plain: list[str], exec_files: list[str], size_mb: int = 64,
            parent: int = 0) -> dict:
    """Enter the namespaces and the private root; returns (in the runner process) a description.

    Raises IsolationError/OSError before any fork into the new PID namespace when the machine does not allow it;
    the caller then stops (the harness probes this once and falls back to running without namespaces)."""
    euid, egid = os.geteuid(), os.getegid()
    helper = _map_helper(os.getpid()) if euid == 0 else None
    mounts_first = False
    try:
        if euid == 0:
            try:  # privileged: the mount namespace belongs to the host's user namespace, not to the sample's
                _unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
                mounts_first = True
            except OSError:
                mounts_first = False
        if mounts_first:
            _build_root(newroot, lib_dirs, plain, exec_files, size_mb)
            _unshare(CLONE_NEWUSER | CLONE_NEWPID)
            pid, req_w, ack_r = helper
            os.write(req_w, b"m")
            mapped = os.read(ack_r, 1) == b"y"
            if not mapped:
                _self_map(euid, egid)
        else:
            _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
            _self_map(euid, egid)
            mapped = False
            _build_root(newroot, lib_dirs, plain, exec_files, size_mb)
            _unshare(CLONE_NEWPID)
    finally:
        if helper is not None:
            pid, req_w, ack_r = helper
            for fd in (req_w, ack_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            os.waitpid(pid, 0)
    os.setresgid(0, 0, 0)
    try:
        os.setgroups([])
    except OSError:
        pass  # "deny" was written: the supplementary groups stay (they are unmapped here)
    os.setresuid(0, 0, 0)
    _drop_capabilities()
    info = {"isolation": "namespaces", "host_uid": HOST_UID if mapped else euid, "workdir": SANDBOX_DIR}
    _prctl(PR_SET_PDEATHSIG, 9)  # the uid change above cleared it: die with the harness again
    if parent and os.getppid() != parent:
        os._exit(1)
    _fork_into_pid_namespace()
    return info


def _relay(status: int) -> None:
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _fork_into_pid_namespace() -> None:
    """P0 -> init (PID 1) -> runner (PID 2). Returns in the runner; the others wait, relay and exit."""
    alive_r, alive_w = os.pipe()  # EOF on alive_r: P0 has died
    init = os.fork()
    if init:
        os.close(alive_r)
        _, status = os.waitpid(init, 0)
        _relay(status)
    os.close(alive_w)
    _prctl(PR_SET_PDEATHSIG, 9)
    if select.select([alive_r], [], [], 0)[0]:  # P0 died before the death signal was armed
        os._exit(1)
    runner = os.fork()
    if runner == 0:
        os.close(alive_r)
        _prctl(PR_SET_PDEATHSIG, 9)
        return
    # init: reap everything; when the runner ends, leave (the kernel then kills the rest of the namespace)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        except InterruptedError:
            continue
        if pid == runner:
            _relay(status)


# ---------------------------------------------------------------------------------------------- seccomp
_SYSCALLS = {  # numbers of the refused calls, per architecture
    "x86_64": {"arch": 0xC000003E, "fork": 57, "vfork": 58, "clone": 56,
               "clone3": 435, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "unshare": 272,
               "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "bpf": 321,
               "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
               "io_uring_register": 427, "keyctl": 250, "add_key": 248, "request_key": 249, "kexec_load": 246,
               "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
               "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
               "fspick": 433, "mount_setattr": 442, "pidfd_getfd": 438, "process_madvise": 440,
               "name_to_handle_at": 303, "open_by_handle_at": 304, "socket": 41, "socketpair": 53},
    "aarch64": {"arch": 0xC00000B7, "clone": 220, "clone3": 435, "ptrace": 117,
                "process_vm_readv": 270, "process_vm_writev": 271, "unshare": 97, "setns": 268, "mount": 40,
                "umount2": 39, "pivot_root": 41, "chroot": 51, "bpf": 280, "perf_event_open": 241,
                "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
                "keyctl": 219, "add_key": 217, "request_key": 218, "kexec_load": 104, "kexec_file_load": 294,
                "init_module": 105, "finit_module": 273, "delete_module": 106, "open_tree": 428,
                "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
                "mount_setattr": 442, "pidfd_getfd": 438, "process_madvise": 440, "name_to_handle_at": 264,
                "open_by_handle_at": 265, "socket": 198, "socketpair": 199},
}


def seccomp_program(machine: str | None = None) -> bytes | None:
    """The classic-BPF seccomp filter (bytes of struct sock_filter[]), or None on an unknown architecture."""
    nums = _SYSCALLS.get(machine or os.uname().machine)
    if nums is None:
        return None
    LD, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, JSET, JGE, BPF_RET|K
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    eperm, enosys, eacces = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS, 0x00050000 | errno.EACCES
    prog: list[tuple[int, int, int, int]] = []

    def ins(code, jt, jf, k):
        prog.append((code, jt, jf, k))

    ins(LD, 0, 0, 4)  # arch
    ins(JEQ, 1, 0, nums["arch"])
    ins(RET, 0, 0, KILL)
    ins(LD, 0, 0, 0)  # syscall number
    if nums["arch"] == 0xC000003E:  # x86_64: refuse the x32 ABI (numbers with bit 30 set)
        ins(JGE, 0, 1, 0x40000000)
        ins(RET, 0, 0, eperm)
    deny = [n for k, n in nums.items() if k not in ("arch", "clone", "clone3", "socket", "socketpair")]
    for n in deny:
        ins(JEQ, 0, 1, n)
        ins(RET, 0, 0, eperm)
    ins(JEQ, 0, 1, nums["clone3"])  # glibc falls back to clone() for threads
    ins(RET, 0, 0, enosys)
    ins(JEQ, 0, 4, nums["clone"])  # threads (CLONE_THREAD) only
    ins(LD, 0, 0, 16)
    ins(JSET, 0, 1, CLONE_THREAD)
    ins(RET, 0, 0, ALLOW)
    ins(RET, 0, 0, eperm)
    for name in ("socket", "socketpair"):  # AF_UNIX only
        ins(LD, 0, 0, 0)
        ins(JEQ, 0, 4, nums[name])
        ins(LD, 0, 0, 16)
        ins(JEQ, 0, 1, 1)
        ins(RET, 0, 0, ALLOW)
        ins(RET, 0, 0, eacces)
    ins(RET, 0, 0, ALLOW)
    return b"".join(struct.pack("=HBBI", *p) for p in prog)


def guard_process(use_seccomp: bool = True) -> dict:
    """No new privileges and (where the architecture is known) the seccomp filter; both survive ``execve``.
    Returns what was applied."""
    applied = {"seccomp": False}
    if not sys.platform.startswith("linux") or _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        return applied
    prog = seccomp_program() if use_seccomp else None
    if prog is None:
        return applied

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    ret = _libc().prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER),
                        ctypes.c_void_p(ctypes.addressof(fprog)), ctypes.c_ulong(0), ctypes.c_ulong(0))
    applied["seccomp"] = ret == 0
    return applied


# ---------------------------------------------------------------------------------------------- entry point
HERE = os.path.dirname(os.path.abspath(__file__))
BOOT = ("import os,sys,json\n"
        "fd={fd}\n"
        "d=json.loads(b''.join(iter(lambda:os.read(fd,1<<16),b'')).decode())\n"
        "os.close(fd)\n"
        "g={{'__name__':'__main__','__builtins__':__builtins__,'SANDBOX':d}}\n"
        "exec(compile(d['child'],'<sandbox runner>','exec'),g)\n")


def _payload_fd(data: bytes) -> int:
    """A descriptor to read ``data`` from after execve (a memfd; a pipe where memfd_create is missing)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("idlm-sandbox-runner", 0)
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    else:
        r, w = os.pipe()
        if len(data) > 60000:
            raise IsolationError("runner payload too large for a pipe")
        os.write(w, data)
        os.close(w)
        fd = r
    os.set_inheritable(fd, True)
    return fd


def main(argv: list[str]) -> None:
    """CONFIG_JSON: {"isolation": "namespaces"|"none", "newroot": DIR, "workdir_mb": N, "site_packages": bool,
    "seccomp": bool, "parent": the harness's pid}. stdin (the job), stdout (the record channel), stderr and the
    secret's descriptor pass through to the runner."""
    cfg = json.loads(argv[1])
    if sys.platform.startswith("linux"):  # die with the harness (the thread that started us), not after it
        _prctl(PR_SET_PDEATHSIG, 9)
        if cfg.get("parent") and os.getppid() != cfg["parent"]:
            os._exit(1)
    sources = {}
    for key, name in (("child", "_sandbox_child.py"), ("hook", "sandbox_hook.py")):
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            sources[key] = f.read()
    site = [p for p in sys.path if os.path.isabs(p) and ("site-packages" in p or "dist-packages" in p)
            and os.path.isdir(p)] if cfg.get("site_packages") else []
    lib_dirs, plain = default_view(bool(cfg.get("site_packages")))
    python = os.path.realpath(sys.executable)
    info: dict = {"isolation": "none"}
    if cfg.get("isolation") == "namespaces":
        try:
            loader = elf_interpreter(python)
            info = isolate(cfg["newroot"], lib_dirs, plain, [python] + ([loader] if loader else []),
                           int(cfg.get("workdir_mb", 64)), int(cfg.get("parent") or 0))
        except Exception as exc:  # noqa: BLE001 - told to the harness, which then runs without namespaces
            os.write(1, ("IDLM-SANDBOX-SETUP " + json.dumps(
                {"error": f"{type(exc).__name__}: {exc}"}) + "\n").encode())
            os._exit(3)
    info.update(guard_process(bool(cfg.get("seccomp", True))))
    payload = {**sources, "info": info, "roots": view_roots(lib_dirs, plain) + [python], "site": site}
    fd = _payload_fd(json.dumps(payload).encode())
    env = dict(os.environ)
    os.execve(python, [python, "-I", "-S", "-B", "-c", BOOT.format(fd=fd)], env)


if __name__ == "__main__":
    main(sys.argv)
