import os
import sys

# Make `import oracle` work from any test module.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_terminal_summary(terminalreporter):
    import oracle

    if oracle.WORST:
        terminalreporter.write_sep("-", "worst parity error / SPEC §6 tolerance, per backend")
        for name, r in sorted(oracle.WORST.items()):
            terminalreporter.write_line(f"{name:>12}: {r:.3f}")
