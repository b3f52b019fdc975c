"""The training step of ``make demo``'s two models, timed step by step in turn.

``make demo`` trains the ferrograd model and then the plain-torch one, so drift on a shared
machine lands on its bytes/s ratio (Xeon family 6 model 207: 1.09x in the recorded demo, while
the same steps alternated here gave 1.25-1.30x). This benchmark builds both models as the demo
does (its default configuration and batches, the same autocast choice, its optimizers from
``demo.optimizer``, gradient clipping) and times one step (forward, backward, optimizer) of each
in turn, eager and through torch.compile, so that the ratio is against the faster torch of the
two. Results per CPU in bench/results/demo_step.json.
"""

from __future__ import annotations

import itertools
import sys

import torch
from harness import Bench, interleaved_times, machine, save_run

from ferrograd import demo

#: Distinct batches cycled through the timed steps.
BATCHES = 6


def stepper(cfg: demo.Config, batches: list[dict], ferrograd: bool, compiled: bool):
    """One training step of the demo's model (``ferrograd`` or plain torch) per call."""
    model, loss_fn = demo.build(cfg, ferrograd)
    params = list(model.parameters())
    opt = demo.optimizer(cfg, params, ferrograd)
    loss_of = torch.compile(loss_fn) if compiled else loss_fn
    turn = itertools.cycle(batches)

    def step() -> float:
        batch = next(turn)
        with demo.autocast(cfg):
            loss = loss_of(model, batch).float() / batch["global_tokens"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    return step


def main(threads: int | None = None, repeats: int = 15) -> None:
    bench = Bench("demo_step", threads)
    cfg = demo.Config(data=[demo.default_data()], compare=True)
    files, _ = demo.split_files(cfg.data)
    data = demo.batches(files, cfg, shuffle=True, group=demo.Group(None))
    batches = [next(data) for _ in range(BATCHES)]
    steps = {
        f"{name}{'_compiled' if compiled else ''}": stepper(cfg, batches, name == "fg", compiled)
        for name in ("torch", "fg")
        for compiled in (False, True)
    }
    # Three warm-up steps each: torch.compile compiles in the first.
    ms = {k: v * 1e3 for k, v in interleaved_times(steps, repeats=repeats, warmup=3).items()}
    strongest = min(("torch", "torch_compiled"), key=ms.__getitem__)
    tokens = sum(b["global_tokens"] for b in batches) / len(batches)  # bytes predicted a step
    for name, t in ms.items():
        bench.add({
            "config": name,
            "ms_per_step": t,
            "bytes_per_s": tokens / t * 1e3,
            "vs_strongest_torch": ms[strongest] / t,
        })  # fmt: skip
    run = {
        "machine": machine(bench.threads),
        "notes": {
            "model": {
                k: getattr(cfg, k)
                for k in ("dim", "layers", "heads", "seq_len", "batch_size", "bits")
            },
            "autocast": str(demo.autocast_dtype(cfg.device)),
            "strongest_torch": strongest,
            "timing": f"median of {repeats} steps per configuration, the four stepped in turn "
            "(order rotating each round) after 3 warm-up steps each",
            "vs_strongest_torch": "the faster torch configuration's step time / this one's",
        },
        "rows": bench.rows,
    }
    save_run("demo_step", run)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
