"""The quiet console of `osprey demo`: the process's and its children's output in the log file,
only the step lines on the terminal; `--verbose` (enabled=False) leaves everything on it."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import subprocess, sys, warnings
    from osprey.console import quiet_console

    with quiet_console(sys.argv[1], enabled=sys.argv[2] == "quiet") as say:
        say("[1/2] step one")
        print("library chatter")
        warnings.warn("a library warning")
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); "
                        "print('child err', file=sys.stderr)"], check=True)
        say("[2/2] step two")
    print("after the block")
    """
)


def run(tmp_path, mode):
    log = tmp_path / f"{mode}.log"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log), mode], capture_output=True, text=True, check=True
    )
    return done.stdout + done.stderr, log.read_text() if log.exists() else ""


def test_quiet_console_keeps_the_terminal_to_step_lines(tmp_path):
    terminal, log = run(tmp_path, "quiet")
    assert terminal.splitlines() == ["[1/2] step one", "[2/2] step two", "after the block"]
    for text in ("library chatter", "a library warning", "child out", "child err"):
        assert text in log and text not in terminal
    assert "step one" not in log


def test_verbose_console_shows_everything(tmp_path):
    terminal, log = run(tmp_path, "verbose")
    for text in ("[1/2] step one", "library chatter", "child out", "child err", "after the block"):
        assert text in terminal
    assert log == ""
