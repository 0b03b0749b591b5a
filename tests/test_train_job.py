"""`python -m kept_jax.train`: the whole job on a tiny Orion, its summary, its export and its refusals."""

import json
import os

from transformers import AutoModelForCausalLM

from kept_jax import train

FAST = ["train.steps=4", "train.log_every=2", "data.seq_len=32", "data.batch_size=4", "data.calib_tokens=512",
        "data.eval_tokens=512"]


def test_job_writes_summary_and_a_verified_export(orion_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--out", out, f"source={orion_checkpoint[0]}", "trainable=lora", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "KL (nats/tok)" in printed and "verified=True" in printed
    summary = json.load(open(os.path.join(out, "summary.json")))
    for key in ("kl_init", "kl_final", "agreement_init", "agreement_final", "steps", "tokens", "export_dir", "opm",
                "trainable"):
        assert key in summary
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 4 * 32 and summary["trainable"] == "lora"
    assert summary["verified"] is True and summary["kl_init"] > 0
    assert [h["step"] for h in summary["history"]] == [2, 4]
    model = AutoModelForCausalLM.from_pretrained(summary["export_dir"], trust_remote_code=False)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_job_refuses_an_existing_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert train.main(["--out", str(out), *FAST]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == "{}"


def test_job_user_errors(orion_checkpoint, llama_checkpoint, tmp_path, capsys):
    assert train.main(["--out", str(tmp_path / "a"), f"source={llama_checkpoint[0]}", *FAST]) == 2
    assert "must be an Orion checkpoint" in capsys.readouterr().err
    assert train.main(["--out", str(tmp_path / "b"), f"source={orion_checkpoint[0]}", "trainable=[nothing_matches]",
                       *FAST]) == 2
    assert "selects no parameter" in capsys.readouterr().err
    assert train.main(["--out", str(tmp_path / "c"), "train.stepz=3"]) == 2
    assert "did you mean train.steps?" in capsys.readouterr().err
    assert not any(os.path.exists(tmp_path / d) for d in "abc")


def test_job_reads_user_text_files(orion_checkpoint, tmp_path, capsys):
    import json as _json

    from kept_jax import corpus

    train_file = tmp_path / "train.jsonl"
    with open(train_file, "w") as f:
        for doc in corpus.read_documents(corpus.TRAIN)[:3]:
            f.write(_json.dumps({"text": doc}) + "\n")
    out = str(tmp_path / "run")
    assert train.main(["--out", out, f"source={orion_checkpoint[0]}", f"data.train={train_file}", "verify=false",
                       "trainable=norms", *FAST]) == 0
    assert json.load(open(os.path.join(out, "summary.json")))["config"]["data"]["train"] == str(train_file)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert train.main(["--out", str(tmp_path / "run2"), f"source={orion_checkpoint[0]}", f"data.train={empty}",
                       *FAST]) == 2
    assert "holds no text" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run2")
