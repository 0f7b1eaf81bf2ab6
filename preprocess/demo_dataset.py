"""The demo dataset (`longplay data demo OUT`): real music that nobody here wrote, with captions from its metadata.

Pieces come from the music21 corpus (it ships inside the PyPI package: Bach chorales, Mozart and Beethoven
quartets, Joplin, Monteverdi, Palestrina, ...); each is rendered to audio by :mod:`preprocess.demo_music`
(excerpt, General MIDI instrument, fluidsynth):

    OUT/audio/*.wav      44.1 kHz stereo excerpts
    OUT/manifest.jsonl   one row per file: path (relative to OUT), caption, composer, title, instrument, key,
                         metre, tempo (BPM of the metre's beat), source (corpus path), seconds
    OUT/demo_dataset.json  what was asked for, what was rendered, and every skipped piece with its reason

Selection is deterministic in ``seed``: the composers' pieces are shuffled with it and taken round-robin over the
composers, so a few minutes already span several styles. Pieces render in worker processes (two by default); a
piece that fails anywhere (parse, MIDI export, rendering, silence) or takes over ``piece_timeout_s`` is skipped
and reported, never fatal.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import random
import shutil
import tempfile
from pathlib import Path

from preprocess.demo_music import (
    COMPOSERS,
    INSTRUMENTS,
    Piece,
    find_soundfont,
    finish_audio,
    render_piece,
    require_tools,
    slug,
)

__all__ = [  # the piece-level names callers of the dataset use, re-exported
    "INSTRUMENTS",
    "Piece",
    "build_demo_dataset",
    "candidate_pieces",
    "data_demo",
    "finish_audio",
    "require_tools",
]


# ---------------------------------------------------------------------------------------------------------------------
# Choosing pieces


def candidate_pieces(seed: int) -> list[str]:
    """Corpus paths (relative, e.g. 'bach/bwv66.6.mxl'), shuffled per composer by ``seed``, then round-robin."""
    from music21 import common, corpus

    root = Path(common.getCorpusFilePath())
    by_composer: dict[str, list[str]] = {name: [] for name in COMPOSERS}
    for path in corpus.getPaths():
        rel = Path(path).relative_to(root)
        if rel.parts[0] in by_composer and rel.suffix in {".mxl", ".xml", ".musicxml", ".krn", ".mid"}:
            by_composer[rel.parts[0]].append(rel.as_posix())
    rng = random.Random(seed)
    order = sorted(by_composer)
    rng.shuffle(order)
    for name in order:
        by_composer[name].sort()
        rng.shuffle(by_composer[name])
    rounds = itertools.zip_longest(*(by_composer[name] for name in order))
    return [piece for row in rounds for piece in row if piece is not None]


# ---------------------------------------------------------------------------------------------------------------------
# The dataset


def _render_in_order(jobs: list[tuple], workers: int, timeout_s: float):
    """Yield (source, result dict or None, skip reason or None) for each job tuple, in order, rendering up to
    ``workers`` pieces at once; a piece over ``timeout_s`` is skipped and its pool replaced (the only way to stop
    music21 mid-parse)."""
    # fork, not spawn: spawn re-imports the caller's __main__, which breaks scripts without a __main__ guard.
    context = mp.get_context("fork")
    pool = context.Pool(workers)
    try:
        pending = [pool.apply_async(render_piece, job) for job in jobs[:workers]]
        next_job = len(pending)
        while pending:
            job_index = next_job - len(pending)
            try:
                yield jobs[job_index][0], pending.pop(0).get(timeout=timeout_s), None
            except mp.TimeoutError:
                yield jobs[job_index][0], None, f"TimeoutError: no result after {timeout_s:.0f} s"
                pool.terminate()
                pool = context.Pool(workers)
                pending = [pool.apply_async(render_piece, jobs[job_index + 1 + i]) for i in range(len(pending))]
            except Exception as err:  # noqa: BLE001 - any failure skips the piece and is reported
                yield jobs[job_index][0], None, f"{type(err).__name__}: {str(err)[:200]}"
            if next_job < len(jobs):
                pending.append(pool.apply_async(render_piece, jobs[next_job]))
                next_job += 1
    finally:
        pool.terminate()


def build_demo_dataset(
    out_dir: str | Path,
    minutes: float = 10.0,
    seed: int = 0,
    max_seconds: float = 30.0,
    soundfont: Path | None = None,
    workers: int = 2,
    piece_timeout_s: float = 120.0,
    min_seconds: float | None = None,
) -> dict:
    """Render about ``minutes`` of corpus music into ``out_dir`` (audio/*.wav + manifest.jsonl).

    With ``min_seconds`` each excerpt's length is drawn uniformly from [min_seconds, max_seconds] (seeded per piece):
    pieces shorter than the training window are what teach a timing-conditioned model to end on time, since only
    their crops carry a ``seconds_total`` below the window and silence after it.

    Deterministic in ``seed``: pieces are taken in :func:`candidate_pieces` order until ``minutes`` is reached, so
    the result does not depend on ``workers``. Returns the summary also written to ``demo_dataset.json``: files,
    total seconds, and ``skipped`` (source, reason) for every piece that failed or timed out.
    """
    from tqdm import tqdm

    missing = require_tools()
    if missing:
        raise RuntimeError(f"the demo dataset needs fluidsynth, a GM soundfont and music21: run `{missing}`")
    soundfont = Path(soundfont) if soundfont else find_soundfont()
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    target = minutes * 60.0
    rows, skipped, total = [], [], 0.0
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=round(target), unit="s", desc="demo dataset") as bar:
        jobs = [
            (source, seed, _excerpt_seconds(source, seed, min_seconds, max_seconds), str(soundfont), tmp)
            for source in candidate_pieces(seed)
        ]
        for source, result, reason in _render_in_order(jobs, workers, piece_timeout_s):
            if result is None:
                skipped.append({"source": source, "reason": reason})
                continue
            relpath = f"audio/{len(rows):04d}_{slug(Path(source).parts[0])}_{slug(Path(source).stem)}.wav"
            shutil.move(result.pop("wav"), out_dir / relpath)
            piece = Piece(**result)
            rows.append({"path": relpath, "caption": piece.caption, **_columns(piece)})
            total += piece.seconds
            bar.update(round(piece.seconds))
            if total >= target:
                break
    with open(out_dir / "manifest.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    summary = {
        "out_dir": str(out_dir),
        "manifest": str(out_dir / "manifest.jsonl"),
        "seed": seed,
        "minutes_requested": minutes,
        "excerpt_seconds": [min_seconds or max_seconds, max_seconds],
        "files": len(rows),
        "seconds": round(total, 3),
        "composers": sorted({row["composer"] for row in rows}),
        "instruments": sorted({row["instrument"] for row in rows}),
        "skipped": skipped,
        "soundfont": str(soundfont),
    }
    (out_dir / "demo_dataset.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _excerpt_seconds(source: str, seed: int, min_seconds: float | None, max_seconds: float) -> float:
    if min_seconds is None:
        return max_seconds
    return round(random.Random(f"{seed}:{source}:length").uniform(min_seconds, max_seconds), 2)


def _columns(piece: Piece) -> dict:
    return {
        "composer": piece.composer,
        "title": piece.title,
        "instrument": piece.instrument,
        "key": piece.key,
        "metre": piece.metre,
        "tempo": piece.tempo,
        "source": piece.source,
        "seconds": piece.seconds,
    }


def data_demo(args: argparse.Namespace) -> int:
    """`longplay data demo OUT [--minutes N]`: build the dataset and print a summary. 1 if nothing rendered."""
    if not args.minutes > 0:
        from pipeline.commands import UsageError  # exits 2 with this one line

        raise UsageError(f"--minutes must be > 0, got {args.minutes}")
    missing = require_tools()
    if missing:
        print(
            f"longplay: the demo dataset needs fluidsynth, a GM soundfont and music21; install them with:\n  {missing}"
        )
        return 1
    summary = build_demo_dataset(args.out, minutes=args.minutes, seed=getattr(args, "seed", 0))
    print(
        f"demo dataset: {summary['files']} files, {summary['seconds'] / 60:.1f} min, "
        f"{len(summary['composers'])} composers, {len(summary['instruments'])} instruments -> {summary['manifest']}"
    )
    for skip in summary["skipped"]:
        print(f"  skipped {skip['source']}: {skip['reason']}")
    return 0 if summary["files"] else 1
