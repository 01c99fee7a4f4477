"""TRL: `EngramSFTTrainer` trains Engram-only and LoRA + Engram models, saves them, and they reload (remote code)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import SFTConfig

from engram_hf.training import EngramSFTTrainer, EngramTrainer, engram_lora, load_lora_engram, set_trainable

from fresh_process import run_without_engram_hf
from tiny_models import encode, tiny_model, tokenizer

TEXTS = ["The capital of France is Paris.", "Engram adds a conditional memory.", "def add(a, b):\n    return a + b"]

RELOAD_SCRIPT = """
    import torch
    from transformers import AutoModelForCausalLM

    folder, ids_file, out_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(ids_file)).logits, out_file)
    """


def _train(model, folder) -> EngramSFTTrainer:
    args = SFTConfig(
        str(folder), max_steps=3, per_device_train_batch_size=3, learning_rate=1e-2, max_length=32, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, bf16=False,  # exact logits
    )
    trainer = EngramSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS * 3}),
        processing_class=tokenizer("llama"), table_optimizer="rowwise_adagrad",
    )
    assert isinstance(trainer, EngramTrainer)
    trainer.train()
    return trainer


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("mode", ["engram", "lora+engram"])
def test_sft_trainer_trains_saves_and_reloads(mode, tmp_path):
    base_folder = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_folder)
    model = AutoModelForCausalLM.from_pretrained(base_folder, trust_remote_code=True).train()
    if mode == "engram":
        set_trainable(model, "engram")
    else:
        model = engram_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    tables = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("engram.table.weight")}
    trainer = _train(model, tmp_path / "run")
    assert any(p.grad is None for p in model.parameters())  # grads were zeroed after the last step
    for name, before in tables.items():
        assert not torch.equal(dict(model.named_parameters())[name], before), name  # sparse table rows trained
    ids = encode("llama", TEXTS[0])
    expected = _logits(model, ids)
    trainer.save_model(tmp_path / "saved")
    if mode == "engram":  # a full Engram checkpoint: its own remote code, no engram_hf needed
        torch.save(ids, tmp_path / "ids.pt")
        run_without_engram_hf(RELOAD_SCRIPT, str(tmp_path / "saved"), str(tmp_path / "ids.pt"),
                              str(tmp_path / "out.pt"), cwd=tmp_path)
        assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    else:  # adapters + Engram delta onto the base, loaded through remote code
        base = AutoModelForCausalLM.from_pretrained(base_folder, trust_remote_code=True)
        assert torch.equal(_logits(load_lora_engram(base, tmp_path / "saved"), ids), expected)
