"""Latent cache vs encoding on the fly: what a training epoch pays for its latents.

Builds a cache of the built-in test images with the built-in tokenizer, then times, in the same run, producing
batches of latents by (a) rendering + encoding the images every time, (b) per-item memory-mapped reads through
``LatentCache`` with a DataLoader, (c) ``LatentCache.load_all``, interleaved over the repeats
(``manifold_fm/timing.py``). Reports the best wall seconds of each and ratios against (a).

    python benchmarks/bench_latent_cache.py        # writes benchmarks/results/latent_cache.{json,md}
    python benchmarks/bench_latent_cache.py --quick --out /tmp/bench   # 24 images, one repeat (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime, timezone

import torch
from torch.utils.data import DataLoader

from manifold_fm.atomic import write_text_atomic
from manifold_fm.data.builtin_images import BuiltinImages
from manifold_fm.data.latents import LatentCache, extract_latents
from manifold_fm.timing import timed
from manifold_fm.tokenizers import builtin_tokenizer

from reporting import add_output_options, command, output_dir, written_by


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=None, help="test images per class (default 40; --quick: 2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--threads", type=int, default=1)
    add_output_options(parser)
    args = parser.parse_args()
    out = output_dir(parser, args)
    per_class = args.per_class or (2 if args.quick else 40)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    tok = builtin_tokenizer()
    ds = BuiltinImages("test", per_class=per_class)
    n = len(ds)
    with tempfile.TemporaryDirectory() as tmp:
        extract_latents(tok, ds, tmp, batch_size=args.batch_size, flip=False, shard_size=256, progress=False)
        cache = LatentCache(tmp)

        @torch.no_grad()
        def on_the_fly() -> None:
            for s in range(0, n, args.batch_size):
                x, _ = ds.render(range(s, min(n, s + args.batch_size)))
                tok.encode(x)

        def mmap_items() -> None:
            for _ in DataLoader(cache, batch_size=args.batch_size, shuffle=True, num_workers=0):
                pass

        def load_all() -> None:
            LatentCache(tmp).load_all()

        fns = {"render_and_encode": on_the_fly, "cache_per_item_mmap": mmap_items, "cache_load_all": load_all}
        best = {k: tm.best_wall_s for k, tm in timed(fns, repeats, warmup=0).items()}
        t_fly, t_mmap, t_all = best["render_and_encode"], best["cache_per_item_mmap"], best["cache_load_all"]
    res = {
        "command": command(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "items": n,
        "latent_shape": list(tok.latent_shape(32)),
        "threads": args.threads,
        "seconds": {"render_and_encode": t_fly, "cache_per_item_mmap": t_mmap, "cache_load_all": t_all},
        "speedup_vs_encode": {"cache_per_item_mmap": t_fly / t_mmap, "cache_load_all": t_fly / t_all},
        "note": "best of repeats; 2-core CPU shared with other jobs, so absolute times are noisy, ratios less so",
    }
    for name, text in (
        ("latent_cache.json", json.dumps(res, indent=1)),
        (
            "latent_cache.md",
            "| latents from | seconds | speed-up vs encoding |\n|---|---|---|\n"
            + "\n".join(f"| {k} | {v:.3f} | {t_fly / v:.1f}x |" for k, v in res["seconds"].items())
            + f"\n\n{n} items of shape {res['latent_shape']}, {args.threads} thread(s), best of {repeats} "
            f"repeat(s), {res['date']}. {written_by()}\n",
        ),
    ):
        write_text_atomic(out / name, text)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
