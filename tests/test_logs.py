"""One way to say what llmcycle is doing: `logging` under `llmcycle`, printed by the CLI as before."""

import logging

from llmcycle.logs import quiet_unless_main, setup_logging


def test_progress_goes_to_stdout_and_warnings_to_stderr_once(capsys):
    setup_logging()
    setup_logging()  # main() runs once per command; several commands in one process print each line once
    log = logging.getLogger("llmcycle.data.run")
    log.info("data: writing shards")
    log.warning("model card: not written (disk full)")
    log.debug("not shown")
    cap = capsys.readouterr()
    assert cap.out == "data: writing shards\n"
    assert cap.err == "model card: not written (disk full)\n"


def test_a_library_user_silences_it(capsys):
    setup_logging()
    logging.getLogger("llmcycle").setLevel(logging.ERROR)
    try:
        logging.getLogger("llmcycle.card").warning("quiet")
        assert capsys.readouterr() == ("", "")
    finally:
        setup_logging()


def test_only_the_main_process_reports_progress(capsys):
    """Under torchrun every rank runs the trainer; a Session quiets the others' progress, not their warnings."""
    setup_logging()
    log = logging.getLogger("llmcycle.train.posttrain.sft")
    restore = quiet_unless_main(False)
    try:
        log.info("train: 10 steps")
        log.warning("a problem on rank 1")
    finally:
        restore()
    log.info("done: fine-tuned model")
    quiet_unless_main(True)()  # the main process: nothing changes
    log.info("again")
    cap = capsys.readouterr()
    assert cap.out == "done: fine-tuned model\nagain\n"
    assert cap.err == "a problem on rank 1\n"
