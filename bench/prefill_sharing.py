"""What sharing the caption among its candidates saves: sampling N candidates of one caption against N candidates of
N different captions of the same length, on the ``tiny`` prior preset.

``PriorDecoder.prefill`` runs each distinct caption (and prompt) once and copies its keys and values to every row
that repeats it; rows in blocks of one caption (as ``Generator`` batches a caption's candidates) also keep a single
copy of the caption's keys and values, which every step reads as one matrix product with the block's queries. With
distinct captions every row is run and keeps its own. Both batches do the same work otherwise (full-length captions,
no padding, the same number of image steps), so the ratio is what the sharing saves: on the prefill alone, and on a
whole sample (prefill + grid_size² − 1 cached steps). The two are timed one after the other in one process, the
median of the timed calls after a warm-up.

    .venv/bin/python bench/prefill_sharing.py            # ~3 min on 2 cores
    .venv/bin/python bench/prefill_sharing.py --write    # ... and record it in bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see generate.py: many small ops per sample

import statistics  # noqa: E402

import torch  # noqa: E402

from _common import THREADS, command_line, time_calls, write_section  # noqa: E402

CANDIDATES = (8, 32, 128, 256)  # up to `dalle eval`'s 256-row batches
TIMED = 5


def _captions(n: int, shared: bool, config) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, config.text_vocab_size, (1 if shared else n, config.text_len), generator=g)
    ids = ids.expand(n, -1).contiguous() if shared else ids  # (n, T)
    return ids, torch.zeros(n, config.text_len, dtype=torch.bool)


def _median_s(fn) -> float:
    return statistics.median(time_calls(fn, TIMED, warmup=1))


def measure(schedule: str) -> list[dict]:
    from dalle.models.sampling import PriorDecoder
    from dalle.models.transformer import PriorTransformer, preset

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = PriorTransformer(preset("tiny", attn_schedule=schedule)).eval()
    decoder = PriorDecoder(model)
    rows = []
    for n in CANDIDATES:
        row = {"candidates": n}
        for shared in (True, False):
            ids, pad = _captions(n, shared, model.config)
            key = "shared" if shared else "distinct"
            with torch.inference_mode():
                row[f"prefill_{key}_ms"] = 1e3 * _median_s(lambda i=ids, p=pad: decoder.prefill(i, p))
                row[f"sample_{key}_ms"] = 1e3 * _median_s(lambda i=ids, p=pad: decoder.sample(i, p, seed=0))
        same_ids, same_pad = _captions(n, True, model.config)
        with torch.inference_mode():  # the shared prefill must give what running every row gives
            shared_logits = decoder.prefill(same_ids, same_pad)
            separate = torch.cat([decoder.prefill(same_ids[i:i + 1], same_pad[i:i + 1]) for i in range(2)])
        row["max_logit_diff"] = float((shared_logits[:2] - separate).abs().max())
        rows.append(row)
    return rows


def table(rows: list[dict], schedule: str) -> str:
    lines = [f"`tiny` prior, {schedule} attention, {THREADS} threads; one caption × N candidates against N distinct "
             "captions of the same length", "",
             "| candidates | prefill: distinct / shared ms | prefill saved | whole sample: distinct / shared ms "
             "| sample saved | shared vs separate prefill logits |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['candidates']} | {r['prefill_distinct_ms']:.1f} / {r['prefill_shared_ms']:.1f} "
                     f"| {r['prefill_distinct_ms'] / r['prefill_shared_ms']:.2f}× "
                     f"| {r['sample_distinct_ms']:.0f} / {r['sample_shared_ms']:.0f} "
                     f"| {r['sample_distinct_ms'] / r['sample_shared_ms']:.2f}× | {r['max_logit_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", default="paper", help="attention schedule of the prior (default paper: row, "
                        "column, row, conv)")
    parser.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    args = parser.parse_args()
    text = table(measure(args.schedule), args.schedule)
    print(text)
    if args.write:
        write_section("prefill_sharing", "Sharing the caption among candidates (`bench/prefill_sharing.py`)",
                      command_line("bench/prefill_sharing.py"), text,
                      [f"median of {TIMED} prefills and {TIMED} whole samples per cell after one warm-up, shared then "
                       "distinct in one process"])


if __name__ == "__main__":
    main()
