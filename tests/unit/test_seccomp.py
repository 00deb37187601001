"""The seccomp program is pure data: check it is well formed for each architecture."""

from __future__ import annotations

import pytest

from sandbox import seccomp


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_program_is_well_formed(machine: str) -> None:
    prog = seccomp.program(machine)
    assert len(prog) < 64
    for i, (code, jt, jf, k) in enumerate(prog):
        if code & 0x07 == 0x05 and code != 0x05:  # conditional jumps stay inside
            assert i + 1 + jt < len(prog)
            assert i + 1 + jf < len(prog)
        assert 0 <= k < 1 << 32
    assert prog[-1] == (seccomp.BPF_RET | seccomp.BPF_K, 0, 0, seccomp.SECCOMP_RET_ALLOW)
    # the architecture is checked first; anything else is killed
    assert prog[0][3] == seccomp._ARCH
    assert prog[1][3] == seccomp.AUDIT_ARCH[machine]
    assert prog[2][3] == seccomp.SECCOMP_RET_KILL_PROCESS


def test_x32_numbers_refused_on_x86_64_only() -> None:
    assert any(k == seccomp.X32_SYSCALL_BIT for _, _, _, k in seccomp.program("x86_64"))
    assert not any(k == seccomp.X32_SYSCALL_BIT for _, _, _, k in seccomp.program("aarch64"))
