"""One piece of the demo dataset: a music21 corpus score -> an excerpt with its metadata -> MIDI -> finished audio.

Each piece is cut to an excerpt of about ``max_seconds``, given one General MIDI instrument (a solo program on every
part, or an ensemble spread over the parts), exported to MIDI and rendered by the fluidsynth CLI with a GM soundfont:

    corpus path -> parse (no pickle cache) -> excerpt (first measures, ~30 s) -> GM programs -> .mid (+ all off)
                -> fluidsynth -ni -F x.wav -r 44100 -> trim to max_seconds, fade, -3 dBFS peak -> audio/KEY.wav

The excerpt plays straight through (repeat signs are dropped); its key is music21's Krumhansl-Schmuckler analysis of
the excerpt itself, so a piece titled in C-sharp minor may be captioned by the key its first bars are in. Which pieces,
and the dataset around them: :mod:`preprocess.demo_dataset`.
"""

from __future__ import annotations

import math
import random
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 44100
SOUNDFONTS = (  # where Debian's fluid-soundfont-gm and other distributions put a GM soundfont
    Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"),
    Path("/usr/share/sounds/sf2/default-GM.sf2"),
    Path("/usr/share/soundfonts/FluidR3_GM.sf2"),
    Path("/usr/share/soundfonts/default.sf2"),
)
INSTALL_TOOLS = "apt-get install -y fluidsynth fluid-soundfont-gm"
INSTALL_MUSIC21 = "pip install music21==10.5.1"

# Corpus folder -> composer as captions name them (used when the score's metadata lacks a composer).
COMPOSERS: dict[str, str] = {
    "bach": "Johann Sebastian Bach",
    "mozart": "Wolfgang Amadeus Mozart",
    "beethoven": "Ludwig van Beethoven",
    "haydn": "Joseph Haydn",
    "monteverdi": "Claudio Monteverdi",
    "palestrina": "Giovanni Pierluigi da Palestrina",
    "joplin": "Scott Joplin",
    "schumann_robert": "Robert Schumann",
    "schumann_clara": "Clara Schumann",
    "josquin": "Josquin des Prez",
    "handel": "George Frideric Handel",
    "corelli": "Arcangelo Corelli",
    "chopin": "Frederic Chopin",
    "schubert": "Franz Schubert",
    "cpebach": "Carl Philipp Emanuel Bach",
    "beach": "Amy Beach",
}

# Instrument as captions name it -> GM programs (0-based) from the top part down; the last repeats for more parts.
INSTRUMENTS: dict[str, tuple[int, ...]] = {
    "piano": (0,),
    "harpsichord": (6,),
    "church organ": (19,),
    "nylon guitar": (24,),
    "harp": (46,),
    "marimba": (12,),
    "vibraphone": (11,),
    "accordion": (21,),
    "string ensemble": (48,),
    "choir": (52,),
    "string quartet": (40, 40, 41, 42),  # violin, violin, viola, cello
    "brass quartet": (56, 56, 60, 57),  # trumpet, trumpet, french horn, trombone
    "woodwind quartet": (73, 68, 71, 70),  # flute, oboe, clarinet, bassoon
    "flute": (73,),
    "violin": (40,),
    "clarinet": (71,),
}
DEFAULT_TEMPO_RANGE = (72, 132)  # quarter-note BPM drawn for scores that carry no tempo


def find_soundfont() -> Path | None:
    return next((p for p in SOUNDFONTS if p.is_file()), None)


def require_tools() -> str | None:
    """None when fluidsynth, a GM soundfont and music21 are all present, else the one command that installs them."""
    commands = []
    if shutil.which("fluidsynth") is None or find_soundfont() is None:
        commands.append(INSTALL_TOOLS)
    try:
        import music21  # noqa: F401
    except ImportError:
        commands.append(INSTALL_MUSIC21)
    return " && ".join(commands) or None


# ---------------------------------------------------------------------------------------------------------------------
# One piece: score -> excerpt with metadata -> MIDI -> wav


@dataclass
class Piece:
    source: str  # corpus path
    composer: str
    title: str
    instrument: str
    key: str  # e.g. "F sharp minor"
    metre: str  # e.g. "3/4"
    tempo: int  # beats per minute, the beat of the metre (quarter in 4/4, dotted quarter in 6/8, half in 2/2)
    score_seconds: float  # length of the excerpt's notes at that tempo
    seconds: float = 0.0  # of the rendered file

    @property
    def caption(self) -> str:
        return (
            f"{self.title} by {self.composer}, played on {self.instrument}, in {self.key}, "
            f"{self.metre} time, {self.tempo} BPM"
        )


def _title_from_path(source: str) -> str:
    """'bach/bwv66.6.mxl' -> 'Chorale BWV 66.6'; 'mozart/k458/movement2.mxl' -> 'K. 458, Movement 2'."""
    words = []
    for part in Path(source).with_suffix("").parts[1:]:
        part = re.sub(r"^bwv(\d+)\.?(\d*)$", lambda m: f"Chorale BWV {m[1]}" + (f".{m[2]}" if m[2] else ""), part)
        part = re.sub(r"^k(\d+)$", r"K. \1", part)
        part = re.sub(r"^opus(\d+)no(\d+)$", r"Op. \1 No. \2", part)
        part = re.sub(r"^movement(\d+)$", r"Movement \1", part)
        part = re.sub(r"^madrigal\.(\d+)\.(\d+)$", r"Madrigal, Book \1 No. \2", part)
        words.append(part.replace("_", " ") if " " in part or "." in part else part.replace("_", " ").title())
    return ", ".join(words)


def _pretty_title(score, source: str) -> str:
    md = score.metadata
    title = " ".join(((md.title if md else None) or "").split())
    movement = " ".join(((md.movementName if md else None) or "").split())
    if re.search(r"\.(mxl|xml|musicxml|krn|mid)$", movement):  # the file name, not a movement name
        movement = ""
    if not title:
        title, movement = movement, ""
    if not title or title == Path(source).stem:  # no title, or only the file name (e.g. "madrigal.4.5")
        return _title_from_path(source)
    return f"{title} ({movement})" if movement and movement not in title else title


def _key_name(score) -> str:
    k = score.analyze("key")
    return f"{k.tonic.name.replace('-', ' flat').replace('#', ' sharp')} {k.mode}"


def prepare_piece(source: str, rng: random.Random, max_seconds: float):
    """Parse ``source``, cut the first measures that fill ``max_seconds``, set tempo and GM programs.

    Returns (excerpt score, Piece). Raises on anything music21 cannot handle (the caller skips the piece).
    """
    from music21 import bar, corpus, instrument, meter, repeat, spanner, stream, tempo

    score = corpus.parse(source, forceSource=True)  # forceSource: no pickle cache is read or written
    if not isinstance(score, stream.Score) or not score.parts:
        raise ValueError("not a single score with parts")
    marks = list(score.recurse().getElementsByClass(tempo.MetronomeMark))
    bpm = marks[0].getQuarterBPM() if marks and marks[0].getQuarterBPM() else rng.randint(*DEFAULT_TEMPO_RANGE)
    bpm = int(round(bpm))
    signature = score.recurse().getElementsByClass(meter.TimeSignature).first() or meter.TimeSignature("4/4")
    seconds_per_measure = signature.barDuration.quarterLength * 60.0 / bpm
    excerpt = score.measures(0, max(1, math.ceil(max_seconds / seconds_per_measure)))
    # The excerpt plays straight through: repeat signs would make the MIDI export expand (or reject) them, and
    # spanners (slurs, hairpins, repeat brackets) do not reach the MIDI file but slow its export down badly.
    for element in list(excerpt.recurse().getElementsByClass((tempo.MetronomeMark, spanner.Spanner))):
        element.activeSite.remove(element)
    for sp in list(excerpt.spannerBundle):
        excerpt.spannerBundle.remove(sp)
    for measure in excerpt.recurse().getElementsByClass(stream.Measure):
        for side in ("leftBarline", "rightBarline"):
            if isinstance(getattr(measure, side), bar.Repeat):
                setattr(measure, side, None)
        for expression in list(measure.getElementsByClass(repeat.RepeatExpression)):
            measure.remove(expression)
    excerpt.parts[0].insert(0, tempo.MetronomeMark(number=bpm))  # one tempo, the one the caption states

    name = rng.choice(sorted(INSTRUMENTS))
    programs = INSTRUMENTS[name]
    for index, part in enumerate(excerpt.parts):
        for old in list(part.recurse().getElementsByClass(instrument.Instrument)):
            old.activeSite.remove(old)
        part.insert(0, instrument.instrumentFromMidiProgram(programs[min(index, len(programs) - 1)]))
    piece = Piece(
        source=source,
        composer=COMPOSERS[Path(source).parts[0]],  # score metadata is unreliable here
        title=_pretty_title(score, source),
        instrument=name,
        key=_key_name(excerpt),
        metre=signature.ratioString,
        tempo=round(bpm / signature.beatDuration.quarterLength),  # per beat: 6/8 counts dotted quarters
        score_seconds=float(excerpt.highestTime) * 60.0 / bpm,
    )
    return excerpt, piece


def write_midi(score, path: Path) -> None:
    """Export ``score`` to a MIDI file that ends in silence: each track closes with All Notes Off (CC 123) and All
    Sound Off (CC 120) on its channels. Without them fluidsynth's file renderer keeps rendering looped sustained
    samples (strings, winds) of some scores long after the last note, instead of stopping at the end."""
    from music21 import midi
    from music21.midi.translate import music21ObjectToMidiFile

    mf = music21ObjectToMidiFile(score)
    for track in mf.tracks:
        channels = sorted({e.channel for e in track.events if isinstance(e, midi.MidiEvent) and e.channel})
        end_of_track = track.events.pop()  # events alternate DeltaTime, MidiEvent; the last pair is (dt, EOT)
        for channel in channels:
            for controller in (123, 120):
                event = midi.MidiEvent(track, type=midi.ChannelVoiceMessages.CONTROLLER_CHANGE, channel=channel)
                event.parameter1, event.parameter2 = controller, 0
                track.events.extend([event, midi.DeltaTime(track, time=0, channel=channel)])
        track.events.append(end_of_track)
        track.updateEvents()
    mf.open(str(path), "wb")
    try:
        mf.write()
    finally:
        mf.close()


def render_midi(midi: Path, wav: Path, soundfont: Path, expected_seconds: float, wall_timeout: float = 120.0) -> None:
    """fluidsynth's fast file renderer (no audio driver, no shell) to 44.1 kHz stereo 16-bit wav.

    A safety net against renders that never end (see :func:`write_midi`): the output is watched and fluidsynth
    stopped once the file holds ``expected_seconds`` + 10 s of audio; the piece is then rejected.
    """
    cmd = ["fluidsynth", "-ni", "-q", "-g", "0.5", "-r", str(SAMPLE_RATE), "-F", str(wav), str(soundfont), str(midi)]
    limit_bytes = (expected_seconds + 10.0) * SAMPLE_RATE * 4 + 4096  # 2 channels x 16 bit, plus the header
    log = wav.with_suffix(".log")  # a file, not a pipe: a chatty fluidsynth must not block on a full pipe
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        start = time.monotonic()
        while proc.poll() is None:
            runaway = wav.is_file() and wav.stat().st_size > limit_bytes
            if runaway or time.monotonic() - start > wall_timeout:
                proc.kill()
                proc.wait()
                what = "rendered past the end of the MIDI" if runaway else f"took over {wall_timeout:.0f} s"
                raise RuntimeError(f"fluidsynth {what}; stopped")
            time.sleep(0.05)
    if proc.returncode != 0 or not wav.is_file():
        raise RuntimeError(f"fluidsynth exited {proc.returncode}: {log.read_text(errors='replace').strip()[-300:]}")


def finish_audio(audio: np.ndarray, max_seconds: float, fade_seconds: float = 0.5) -> np.ndarray:
    """(N, 2) rendered audio -> trimmed to max_seconds with a fade-out, trailing silence (< -60 dB) dropped,
    peak at -3 dBFS. Raises ValueError on a silent render."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak < 1e-4:
        raise ValueError("rendered audio is silent")
    loud = np.flatnonzero(np.max(np.abs(audio), axis=1) > peak * 1e-3)
    audio = audio[: min(loud[-1] + 1, round(max_seconds * SAMPLE_RATE))]
    fade = min(round(fade_seconds * SAMPLE_RATE), audio.shape[0])
    audio[audio.shape[0] - fade :] *= np.linspace(1.0, 0.0, fade)[:, None]
    return (audio * (10 ** (-3 / 20) / peak)).astype(np.float32)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def render_piece(source: str, seed: int, max_seconds: float, soundfont: str, work_dir: str) -> dict:
    """One corpus piece -> ``work_dir``/<slug>.wav (finished audio); returns the Piece as a dict plus ``wav``.

    Runs in a worker process so that a score music21 chokes on can be abandoned after a timeout. The piece's random
    choices are seeded by (seed, source), so they do not depend on which other pieces failed.
    """
    excerpt, piece = prepare_piece(source, random.Random(f"{seed}:{source}"), max_seconds)
    stem = Path(work_dir) / slug(source)
    midi, raw, done = stem.with_suffix(".mid"), stem.with_suffix(".raw.wav"), stem.with_suffix(".wav")
    write_midi(excerpt, midi)
    render_midi(midi, raw, Path(soundfont), piece.score_seconds)
    data, rate = sf.read(raw, dtype="float32", always_2d=True)  # (N, C)
    raw.unlink()
    if rate != SAMPLE_RATE or data.shape[1] != 2:
        raise ValueError(f"fluidsynth wrote {rate} Hz x {data.shape[1]} channels")
    audio = finish_audio(data, max_seconds)
    sf.write(done, audio, SAMPLE_RATE, subtype="PCM_16")
    piece.seconds = round(audio.shape[0] / SAMPLE_RATE, 3)
    return {"wav": str(done), **asdict(piece)}
