import os
import sys

# Make `import oracle` work from any test module.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run in Triton's interpreter (tests/_backends.py,
# use_triton_interpreter), which must be on before anything imports triton.language: its own
# @triton.jit helpers (tl.sum, ...) are made at that import, for one mode only. Setting it here
# keeps any subset and order of test files working (`pytest tests/test_dropin.py
# tests/test_special_cases.py` failed in the Triton AdamP tests before).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_terminal_summary(terminalreporter):
    import oracle

    if oracle.WORST:
        terminalreporter.write_sep("-", "worst parity error / SPEC §6 tolerance, per backend")
        for name, r in sorted(oracle.WORST.items()):
            terminalreporter.write_line(f"{name:>12}: {r:.3f}")
