"""What storing an adapter's LoRA in bfloat16 changes: the same text read by the adapter as stored and by
the adapter with its LoRA weights rounded to bfloat16 (the backbone and HMT's parameters untouched).

    python -m benchmarks.lora_dtype --adapter src/hmt/adapters/smollm2-135m-hmt --tokens 4096

Prints (and writes with --out) the mean KL per token between the two readings, how often their argmax
agrees, each perplexity, and the size of the LoRA file as stored and in bfloat16.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer

app = typer.Typer(add_completion=False)


@app.command()
def main(
    adapter: Annotated[Path, typer.Option(help="Adapter folder with LoRA weights.")],
    tokens: Annotated[int, typer.Option(help="Tokens of the essays' test split read by both.")] = 4096,
    out: Annotated[Path | None, typer.Option(help="Write the numbers to this JSON file.")] = None,
) -> None:
    from hmt.backbone import load_backbone, quiet_transformers, store_floats_as
    from hmt.data import load_documents, token_stream
    from hmt.model import HMTForCausalLM

    quiet_transformers()
    lora = adapter / "adapter_model.safetensors"
    if not lora.is_file():
        raise typer.BadParameter(f"{adapter} holds no LoRA weights")
    plain = load_backbone(None, dtype="fp32")
    ids = token_stream(load_documents("essays", "test"), plain.tokenizer, tokens)[None]
    with tempfile.TemporaryDirectory() as scratch:
        rounded = Path(scratch) / "adapter"
        shutil.copytree(adapter, rounded)
        store_floats_as(rounded / "adapter_model.safetensors", torch.bfloat16)
        sizes = {
            "stored": lora.stat().st_size,
            "bfloat16": (rounded / "adapter_model.safetensors").stat().st_size,
        }
        outputs = {}
        with torch.no_grad():
            for name, folder in (("stored", adapter), ("bfloat16", rounded)):
                model = HMTForCausalLM.from_pretrained(folder, plain.model).eval()
                outputs[name] = model(ids, return_logits=True)
    stored, rounded_out = outputs["stored"], outputs["bfloat16"]
    mask = stored.token_mask[0]
    log_p = torch.log_softmax(stored.logits[0].float(), -1)
    log_q = torch.log_softmax(rounded_out.logits[0].float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    result = {
        "adapter": str(adapter),
        "tokens": int(ids.shape[1]),
        "mean_kl_nats_per_token": float(kl[mask].mean()),
        "max_kl": float(kl[mask].max()),
        "argmax_agreement": float((log_p.argmax(-1) == log_q.argmax(-1))[mask].float().mean()),
        "ppl": {name: float(out.loss.exp()) for name, out in outputs.items()},
        "lora_file_bytes": sizes,
    }
    typer.echo(json.dumps(result, indent=2))
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    app()
