"""Real data the project does not generate: letters drawn by the fonts installed on the machine, and number words
spoken by `espeak-ng`'s voices, split so that the test split's fonts and voices are never trained on.

Both come from Debian packages (`apt-get install fonts-dejavu-core fonts-dejavu-extra fonts-liberation2
espeak-ng`; `.ci/run` installs them): the glyphs are the fonts' own outlines, rasterised by FreeType, and the
speech is espeak-ng's formant synthesis. The rows follow the simple question / answer convention
`load_conversations` reads (`image` or `audio`, `question`, `answer`), plus the font or voice that made them.

- `build_letters_dataset`: one capital letter per 32x32 image, at several sizes, offsets and ink/paper shades;
  the fonts are split between train, validation and test (whole fonts: a test font's glyphs are never seen).
- `build_spoken_words_dataset`: one number word ("zero" to "nine") per clip at 22,050 Hz, silence trimmed and at most
  1 s long, at several speeds and pitches; the voice variants are split the same way (each variant with every
  English accent).

The same arguments give the same rows on the same fonts and espeak-ng build.
"""

import random
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "ESPEAK_ACCENTS",
    "FONT_DIRECTORIES",
    "LETTERS",
    "NUMBER_WORDS_SPOKEN",
    "build_letters_dataset",
    "build_spoken_words_dataset",
    "draw_letter",
    "espeak_variants",
    "installed_fonts",
    "speak",
    "split_names",
]

LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
NUMBER_WORDS_SPOKEN = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FONT_DIRECTORIES = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation2")
# espeak-ng's English accents that synthesise without extra voice packages (the mbrola voices need mbrola)
ESPEAK_ACCENTS = (
    "en",
    "en-us",
    "en-029",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-gb-x-rp",
    "en-us-nyc",
)
# variants that set only the speed, which every clip sets itself: they would speak as the accent's default voice
_SPEED_ONLY_VARIANTS = ("fast",)
LETTER_QUESTION = "Which letter is this?"
WORD_QUESTION = "Which number is spoken?"
_SPLIT_SIZES = {"train": 0.7, "validation": 0.15, "test": 0.15}
_APT = "apt-get install -y fonts-dejavu-core fonts-dejavu-extra fonts-liberation2 espeak-ng"
# a symbol font whose capitals are not the Latin letters' usual shapes
_NOT_TEXT_FONTS = ("DejaVuMathTeXGyre",)

LETTERS_FEATURES = Features(
    {"image": ImageFeature(), "question": Value("string"), "answer": Value("string"), "font": Value("string")}
)
WORDS_FEATURES = Features(
    {
        "audio": {"array": List(Value("float32")), "sampling_rate": Value("int32")},
        "question": Value("string"),
        "answer": Value("string"),
        "voice": Value("string"),
        "speed": Value("int32"),
        "pitch": Value("int32"),
    }
)


def installed_fonts(directories: Sequence[str | Path] = FONT_DIRECTORIES) -> list[Path]:
    """The TrueType fonts in `directories` (sorted by file name), symbol fonts left out.

    Raises:
        `FileNotFoundError`: no font there, with the command that installs them.
    """
    fonts = sorted(
        (
            path
            for directory in directories
            for path in Path(directory).glob("*.ttf")
            if path.stem not in _NOT_TEXT_FONTS
        ),
        key=lambda path: path.name,
    )
    if not fonts:
        raise FileNotFoundError(f"no .ttf font in {list(map(str, directories))}: install them with `{_APT}`")
    return fonts


def espeak_variants() -> list[str]:
    """The voice variants espeak-ng lists (`espeak-ng --voices=variant`), by the file names `-v accent+variant`
    takes, sorted; `fast` (which sets only the speed) left out.

    Raises:
        `FileNotFoundError`: espeak-ng is not installed, with the command that installs it.
    """
    executable = _espeak()
    listing = subprocess.run([executable, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    # columns: Pty Language Age/Gender VoiceName File; `-v accent+name` takes the file's name (`!v/m3` -> `m3`), and
    # an unknown name falls back to the accent's default voice without a word. One file name holds a space (left out).
    header, *lines = listing.splitlines()
    start = header.index("File")
    files = {re.split(r"\s{2,}", line[start:].strip())[0] for line in lines if len(line) > start}
    names = {name.removeprefix("!v/") for name in files if name.startswith("!v/") and " " not in name}
    return sorted(names - set(_SPEED_ONLY_VARIANTS))


def split_names(names: Sequence[str], split_sizes: Mapping[str, float], seed: int) -> dict[str, list[str]]:
    """`names` shuffled with `seed` and cut into consecutive groups in the proportions of `split_sizes` (at least one
    name each), every name in exactly one group."""
    if not names:
        raise ValueError("no names to split")
    if len(names) < len(split_sizes):
        raise ValueError(f"{len(names)} names cannot fill the {len(split_sizes)} splits {list(split_sizes)}")
    if any(size <= 0 for size in split_sizes.values()):
        raise ValueError(f"split sizes must be positive, got {dict(split_sizes)}")
    shuffled = sorted(names)
    random.Random(seed).shuffle(shuffled)
    total, splits, start = sum(split_sizes.values()), {}, 0
    for position, (split, size) in enumerate(split_sizes.items()):
        remaining = len(split_sizes) - position - 1
        count = round(len(names) * size / total) if remaining else len(names) - start
        count = min(max(1, count), len(names) - start - remaining)
        splits[split] = shuffled[start : start + count]
        start += count
    return splits


def build_letters_dataset(
    per_letter_and_font: int | Mapping[str, int] = 8,
    fonts: Sequence[str | Path] | None = None,
    letters: Sequence[str] = LETTERS,
    image_size: int = 32,
    split_sizes: Mapping[str, float] = _SPLIT_SIZES,
    seed: int = 0,
) -> DatasetDict:
    """Capital letters drawn by installed fonts, one per image, asked "Which letter is this?".

    Each image is `image_size` pixels square: the letter at a random size (40-80% of the image's height), offset
    from the centre by up to an eighth of the image, in a dark ink on a light paper (random grey shades). The fonts
    are split between the splits by `split_names` (whole fonts).

    Args:
        per_letter_and_font (`int` or `Mapping[str, int]`, defaults to 8): images of each letter in each font, for
            every split or per split name.
        fonts (`Sequence[str | Path]`, *optional*): font files (default: `installed_fonts()`).
        letters (`Sequence[str]`, defaults to `LETTERS`): the letters drawn (the answers).
        image_size (`int`, defaults to 32): side of each image, in pixels.
        split_sizes (`Mapping[str, float]`, defaults to 70/15/15% of the fonts): the splits and their shares.
        seed (`int`, defaults to 0): seeds the font split and the drawing.

    Returns:
        `DatasetDict`: per split, rows with `image` (PIL), `question`, `answer` (the letter) and `font` (its file
        name).
    """
    fonts = [Path(font) for font in (installed_fonts() if fonts is None else fonts)]
    by_name = {font.stem: font for font in fonts}
    splits = {}
    for index, (split, names) in enumerate(split_names(list(by_name), split_sizes, seed).items()):
        count = per_letter_and_font[split] if isinstance(per_letter_and_font, Mapping) else per_letter_and_font
        rng = random.Random(f"letters-{seed}-{index}")
        rows = [
            {"image": draw_letter(letter, by_name[name], image_size, rng), "question": LETTER_QUESTION,
             "answer": letter, "font": name}
            for name in names for letter in letters for _ in range(count)
        ]  # fmt: skip
        rng.shuffle(rows)
        splits[split] = Dataset.from_list(rows, features=LETTERS_FEATURES)
    return DatasetDict(splits)


def draw_letter(letter: str, font_path: str | Path, image_size: int, rng: random.Random) -> Image.Image:
    """`letter` in the font at `font_path`, centred on its ink box, at a random size, offset and shade."""
    size = round(image_size * rng.uniform(0.4, 0.8))
    font = ImageFont.truetype(str(font_path), size=size)
    paper, ink = rng.randint(180, 255), rng.randint(0, 90)
    image = Image.new("RGB", (image_size, image_size), (paper,) * 3)
    left, top, right, bottom = font.getbbox(letter)
    shift = image_size / 8
    x = (image_size - (right - left)) / 2 - left + rng.uniform(-shift, shift)
    y = (image_size - (bottom - top)) / 2 - top + rng.uniform(-shift, shift)
    ImageDraw.Draw(image).text((x, y), letter, font=font, fill=(ink,) * 3)
    return image


def build_spoken_words_dataset(
    per_word_and_voice: int | Mapping[str, int] = 1,
    variants: Sequence[str] | None = None,
    accents: Sequence[str] = ESPEAK_ACCENTS,
    words: Sequence[str] = NUMBER_WORDS_SPOKEN,
    split_sizes: Mapping[str, float] = _SPLIT_SIZES,
    seed: int = 0,
    progress: bool = True,
) -> DatasetDict:
    """Number words spoken by espeak-ng, one per clip, asked "Which number is spoken?".

    A voice is an accent with a variant (`en-us+Storm`); the variants are split between the splits by `split_names`,
    so a test voice's variant is never trained on. Each clip is spoken at a random speed (140-200 words a minute)
    and pitch (30-70 of 99) at espeak-ng's rate (22,050 Hz), trimmed of its leading and trailing silence and cut to
    1 s.

    Args:
        per_word_and_voice (`int` or `Mapping[str, int]`, defaults to 1): clips of each word in each voice, for
            every split or per split name.
        variants (`Sequence[str]`, *optional*): espeak-ng voice variants (default: `espeak_variants()`).
        accents (`Sequence[str]`, defaults to `ESPEAK_ACCENTS`): the accents every variant speaks with.
        words (`Sequence[str]`, defaults to the number words): the words spoken (the answers).
        split_sizes (`Mapping[str, float]`, defaults to 70/15/15% of the variants): the splits and their shares.
        seed (`int`, defaults to 0): seeds the variant split, the speeds and the pitches.
        progress (`bool`, defaults to `True`): show a progress bar.

    Returns:
        `DatasetDict`: per split, rows with `audio` (`{"array", "sampling_rate"}`), `question`, `answer` (the word),
        and what `speak` made it with: `voice` (`accent+variant`), `speed`, `pitch`.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    variants = espeak_variants() if variants is None else list(variants)
    splits = {}
    # espeak-ng runs as a process per clip: two at a time keep both cores busy
    with ThreadPoolExecutor(max_workers=2) as pool:
        for index, (split, names) in enumerate(split_names(variants, split_sizes, seed).items()):
            count = per_word_and_voice[split] if isinstance(per_word_and_voice, Mapping) else per_word_and_voice
            rng = random.Random(f"words-{seed}-{index}")
            jobs = [(word, f"{accent}+{variant}", rng.randint(140, 200), rng.randint(30, 70))
                    for variant in names for accent in accents for word in words for _ in range(count)]  # fmt: skip
            clips = pool.map(lambda job: speak(*job), jobs)
            rows = [
                {"audio": {"array": array, "sampling_rate": rate}, "question": WORD_QUESTION, "answer": word,
                 "voice": voice, "speed": speed, "pitch": pitch}
                for (word, voice, speed, pitch), (array, rate) in zip(
                    jobs, tqdm(clips, total=len(jobs), desc=f"speaking ({split})", disable=not progress, leave=False)
                )
            ]  # fmt: skip
            rng.shuffle(rows)
            splits[split] = Dataset.from_list(rows, features=WORDS_FEATURES)
    return DatasetDict(splits)


def speak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """`text` spoken by espeak-ng in `voice` at `speed` and `pitch`, silence trimmed, at most 1 s: `(waveform,
    sampling_rate)` at espeak-ng's own rate (22,050 Hz; the processor resamples).

    Raises:
        `RuntimeError`: espeak-ng fails or says nothing, with its message.
    """
    result = subprocess.run(
        [_espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text], capture_output=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"espeak-ng -v {voice} failed on {text!r}: {result.stderr.decode().strip()}")
    # a streamed WAV: its header gives no length, the samples run from the `data` chunk to the end
    header = result.stdout.find(b"data")
    rate = int.from_bytes(result.stdout[24:28], "little")
    samples = result.stdout[header + 8 :]
    waveform = np.frombuffer(samples[: len(samples) // 2 * 2], dtype=np.int16).astype(np.float32) / 32768.0
    loud = np.flatnonzero(np.abs(waveform) > 0.02)
    if header < 0 or loud.size == 0:
        raise RuntimeError(f"espeak-ng -v {voice} said nothing for {text!r}")
    return waveform[loud[0] : loud[-1] + 1][:rate], rate


def _espeak() -> str:
    executable = shutil.which("espeak-ng")
    if executable is None:
        raise FileNotFoundError(f"espeak-ng is not installed: install it with `{_APT}`")
    return executable
