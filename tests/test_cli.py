"""The `poso` command line: --help imports nothing heavy, every flag says what it does, and
TensorFlow's native banners are dropped from stderr (pipeline/quiet.py)."""

import argparse
import subprocess
import sys

from pipeline import cli

HEAVY = ("tensorflow", "apache_beam", "tfx", "benchmarks", "serving", "models")


def _in_a_fresh_interpreter(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_help_imports_neither_tensorflow_nor_the_server_nor_the_benchmarks():
    done = _in_a_fresh_interpreter(
        "import sys\nfrom pipeline import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    assert done.returncode == 0, done.stderr
    assert "usage: poso [-h] COMMAND" in done.stdout and "rollback" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


SUBCOMMAND_HELP_MUST_NOT_IMPORT = ("tensorflow", "apache_beam", "tfx", "models")


def test_no_command_s_help_imports_tensorflow():
    """`poso COMMAND --help` (and `poso bench NAME --help`) for every command, in one fresh
    interpreter: each prints its flags, and none imports TensorFlow, Beam, TFX or the models
    (the first command that does is named)."""
    done = _in_a_fresh_interpreter(
        "import contextlib, io, sys\nfrom pipeline import cli\n"
        "commands = [[name, *([sub] if sub else [])] for name, command in cli.COMMANDS.items()\n"
        "            for sub in (command.subcommands or [None])]\n"
        "for argv in commands:\n"
        "    shown = io.StringIO()\n"
        "    with contextlib.redirect_stdout(shown):\n"
        "        try:\n"
        "            cli.main([*argv, '--help'])\n"
        "        except SystemExit:\n"
        "            pass\n"
        "    heavy = sorted({m.split('.')[0] for m in sys.modules} & set(%r))\n"
        "    print(' '.join(argv), 'usage: poso ' + ' '.join(argv) in shown.getvalue(), heavy)\n"
        % (SUBCOMMAND_HELP_MUST_NOT_IMPORT,))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line for line in lines if not line.endswith(" True []")] == []
    assert {"serve True []", "compile-kubeflow True []", "predict True []", "model-summary True []",
            "bench train True []"} <= set(lines)
    assert len(lines) == sum(len(command.subcommands or [None]) for command in cli.COMMANDS.values())


def _flags_without_help(parser, where=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _flags_without_help(sub, (*where, name))
        elif action.option_strings and not action.help and not isinstance(action, argparse._HelpAction):
            yield f"poso {' '.join(where)} {action.option_strings[0]}"


def test_every_flag_of_every_command_has_help_and_shows_its_default():
    parser = cli.build_parser()
    assert list(_flags_without_help(parser)) == []
    run_help = cli.build_parser(["run"])._subparsers._group_actions[0].choices["run"].format_help()
    assert "full passes" in run_help and "(default: 1)" in run_help and "(default: $POSO_HOME" in run_help
    backfill_help = cli.build_parser(["backfill"])._subparsers._group_actions[0].choices["backfill"].format_help()
    assert "(included)" in backfill_help


BANNER = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
          "I0000 00:00:1796241430.763252   14004 port.cc:153] oneDNN custom operations are on.\n"
          "E0000 00:00:1796241443.898258   14004 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n")


def test_native_banners_are_dropped_from_stderr_of_the_process_and_its_children():
    child = f"import os; os.write(2, {(BANNER + 'child problem' + chr(10)).encode()!r})"
    done = _in_a_fresh_interpreter(
        "import os, subprocess, sys\nfrom pipeline import quiet\nquiet.filter_native_stderr()\n"
        f"os.write(2, {(BANNER + 'real problem' + chr(10)).encode()!r})\n"
        f"subprocess.run([sys.executable, '-c', {child!r}])\n"
        "print('done', file=sys.stderr)\n")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stderr.splitlines()) == ["child problem", "done", "real problem"]


def test_lines_written_just_before_os_exit_reach_stderr_once_the_filter_is_restored():
    # The stop watchdog ends the process with os._exit, which runs no atexit hook: the lines still
    # in the filter's pipe (the command's last ones) would die with the copying thread.
    lines = "".join(f"line {i}\n" for i in range(200))
    done = _in_a_fresh_interpreter(
        "import os, sys\nfrom pipeline import quiet\nquiet.filter_native_stderr()\n"
        f"sys.stderr.write({(BANNER + lines)!r}); sys.stderr.flush()\n"
        "quiet.restore_stderr(); quiet.restore_stderr()\n"   # the second call is a no-op
        "print('last', file=sys.stderr, flush=True)\nos._exit(5)\n")
    assert done.returncode == 5
    assert done.stderr.splitlines() == [f"line {i}" for i in range(200)] + ["last"]


def test_generate_says_what_it_wrote_and_where(tmp_path, capsys):
    assert cli.main(["generate", "--out", str(tmp_path), "--start", "2022-04-08", "--days", "2",
                     "--rows-per-day", "50"]) == 0
    assert capsys.readouterr().out == (f"wrote 100 rows for 2022-04-08..2022-04-09 in 2 daily files "
                                       f"under {tmp_path / 'logs'}\n")


def test_beam_workers_start_notices_are_kept_off_the_terminal_other_warnings_not():
    import logging

    from pipeline import local_runner

    def shown(name, level, message):
        return local_runner._drop_expected_warnings(logging.LogRecord(name, level, __file__, 1, message, None, None))

    relay = ('Worker: severity: WARN timestamp {   seconds: 1796244371 } message: "No semi_persistent_directory '
             'found:  User registered objects ... may not be effective"')
    job_service = "apache_beam.runners.portability.local_job_service"
    assert not shown(job_service, logging.WARNING, relay)
    assert shown(job_service, logging.ERROR, relay)
    assert shown(job_service, logging.WARNING, 'Worker: severity: WARN message: "No space left on device"')
    assert shown("tensorflow", logging.WARNING, "No semi_persistent_directory found")
