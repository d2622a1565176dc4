#!/usr/bin/python3
"""run-under.py [--without-io-uring] PROFILE.json -- COMMAND [ARGS...]

Runs COMMAND under a seccomp profile in Docker's JSON format, compiled with libseccomp the way
Docker compiles it for a container with Docker's default capabilities on this architecture: the
test of packaging/seccomp/ringproxy.json without a container runtime. --without-io-uring leaves out
the rule that allows the io_uring calls, which gives Docker's own default profile (ringproxy.json
is that profile plus that one rule).

Needs libseccomp's Python binding (Debian: python3-seccomp; /usr/bin/python3).
"""
import os
import platform
import sys

import json
import seccomp

# The capabilities Docker grants a container by default (moby's oci/caps/defaults.go).
DEFAULT_CAPS = {
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
}
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
OPS = {
    "SCMP_CMP_EQ": seccomp.EQ, "SCMP_CMP_NE": seccomp.NE, "SCMP_CMP_LT": seccomp.LT,
    "SCMP_CMP_LE": seccomp.LE, "SCMP_CMP_GT": seccomp.GT, "SCMP_CMP_GE": seccomp.GE,
    "SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ,
}
IO_URING = {"io_uring_setup", "io_uring_enter", "io_uring_register"}


def kernel():
    parts = platform.release().split("-")[0].split(".")
    return tuple(int(p) for p in parts[:2])


def applies(rule):
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("caps") and not set(inc["caps"]) <= DEFAULT_CAPS:
        return False
    if inc.get("arches") and ARCH not in inc["arches"]:
        return False
    if inc.get("minKernel") and kernel() < tuple(int(p) for p in inc["minKernel"].split(".")[:2]):
        return False
    if exc.get("caps") and set(exc["caps"]) & DEFAULT_CAPS:
        return False
    if exc.get("arches") and ARCH in exc["arches"]:
        return False
    return True


def action(name, errno):
    if name == "SCMP_ACT_ALLOW":
        return seccomp.ALLOW
    if name == "SCMP_ACT_ERRNO":
        return seccomp.ERRNO(errno)
    raise SystemExit(f"run-under.py: action {name} is not supported")


def main(argv):
    without = "--without-io-uring" in argv
    argv = [a for a in argv if a != "--without-io-uring"]
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit(__doc__)
    profile = json.load(open(argv[0]))
    f = seccomp.SyscallFilter(action(profile["defaultAction"], profile.get("defaultErrnoRet", 1)))
    for rule in profile["syscalls"]:
        if not applies(rule):
            continue
        act = action(rule["action"], rule.get("errnoRet", 1))
        args = [seccomp.Arg(a["index"], OPS[a["op"]], a["value"], a.get("valueTwo", 0)) for a in rule.get("args") or []]
        for name in rule["names"]:
            if without and name in IO_URING:
                continue
            try:
                f.add_rule(act, name, *args)
            except (RuntimeError, ValueError, OSError):
                pass  # a call this architecture or libseccomp does not know
    f.load()
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
