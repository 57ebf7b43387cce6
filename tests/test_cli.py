"""The ``hf-sdft`` command line: the verb registry, its generated usage, and every verb parsed
through its dataclasses."""

import json
from dataclasses import dataclass

import pytest

from hf_sdft import cli
from hf_sdft.cli import VERBS, Verb, main
from tests.helpers import make_model, write_tiny_inputs


@dataclass
class Dummy:
    n: int = 1


def test_help_lists_every_registered_verb(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert set(VERBS) >= {"recover", "degrade", "cache-teacher", "study", "rewrite", "eval", "card"}
    for v in VERBS.values():
        assert f"  {v.name}" in out and v.help in out


def test_usage_is_built_from_the_registry(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(cli, "VERBS", dict(VERBS))
    cli.verb("frobnicate", "a dummy verb", "tests.test_cli:Dummy")(ran.append)
    assert cli.VERBS["frobnicate"] == Verb("frobnicate", "a dummy verb", ran.append, ("tests.test_cli:Dummy",))
    assert "frobnicate" in cli.usage() and "a dummy verb" in cli.usage()
    main(["frobnicate", "--n", "3"])
    assert ran == [Dummy(3)]


@pytest.mark.parametrize("argv", [[], ["frob"]])
def test_no_or_unknown_verb_exits_2_with_the_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: hf-sdft {") and ("unknown verb 'frob'" in err) == bool(argv)


@pytest.mark.parametrize("name", list(VERBS))
def test_each_verb_help_shows_its_fields(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hf-sdft {name}") and VERBS[name].help.split(" (")[0] in " ".join(out.split())


def test_eval_takes_recovery_data_fields_only(capsys):
    ev, data = VERBS["eval"].parse(["--student", "S", "--teacher", "T", "--txt_sample_by", "paragraph",
                                    "--block_size", "64", "--max_eval_blocks", "5", "--probe_blocks", "4",
                                    "--tasks", "a,b", "--limit", "7"])
    assert (ev.student, ev.teacher) == ("S", "T")
    assert (data.txt_sample_by, data.block_size, data.max_eval_blocks, data.probe_blocks) == ("paragraph", 64, 5, 4)
    assert (data.eval_tasks, data.eval_limit, data.eval_file, data.dataset_text_field) == ("a,b", 7, None, "text")
    with pytest.raises(ValueError, match="txt_sample_by='word'"):  # RecoveryArguments' own checks
        VERBS["eval"].parse(["--student", "S", "--teacher", "T", "--txt_sample_by", "word"])
    with pytest.raises(ValueError, match="not used"):  # a recovery field that eval does not read
        VERBS["eval"].parse(["--student", "S", "--teacher", "T", "--degradation", "prune"])


def test_card_takes_its_folder_bare_or_as_a_flag():
    assert VERBS["card"].parse(["out", "--repo_id", "me/m"])[0] == VERBS["card"].parse(
        ["--output_dir", "out", "--repo_id", "me/m"])[0]
    assert VERBS["card"].parse(["out"])[0].output_dir == "out"


def test_eval_command_on_tiny_models(tmp_path, capsys):
    root = write_tiny_inputs(tmp_path, 10, 40)
    make_model(seed=1).save_pretrained(tmp_path / "student")
    main(["eval", "--student", str(tmp_path / "student"), "--teacher", str(root / "model"), "--eval_file",
          str(root / "eval.txt"), "--txt_sample_by", "line", "--block_size", "32", "--max_eval_blocks", "12",
          "--probe_blocks", "4"])
    result = json.loads(capsys.readouterr().out)
    assert set(result["perplexity"]) == {"student", "teacher"} and all(p > 1 for p in result["perplexity"].values())
    assert set(result["cka"]) == {"0", "1"} and 0 < result["cka_mean"] < 1
