"""Caption cleaning (the same for training captions and inference prompts) and the v1.5 prompt template.

The GOLDEN outputs were produced by the reference implementation (BeautifulSoup + ftfy).
"""

import pytest

from mindspeed_mm_osp.models.text import preprocess
from mindspeed_mm_osp.models.text.preprocess import apply_prompt_template, clean_caption

# First line of the released sora.txt (its own typos included), with the U+00A0 no-break
# spaces it contains.
TOKYO = ("A stylish woman walks down a Tokyo street filled with warm glowing neon and animated city signage."
         "\u00a0She wears a black leather jacket, along red dress, and black boots, and carries a black purse."
         "\u00a0She wears sunglasses and red lipstick. She walks confidently and casually. The street is dampand "
         "reflective, creating a mirror effect of thecolorful lights. Many pedestrians walk about.")
TOKYO_CLEAN = ("high quality, a stylish woman walks down a tokyo street filled with warm glowing neon and animated "
               "city signage. she wears a black leather jacket, along red dress, and black boots, and carries a "
               "black purse. she wears sunglasses and red lipstick. she walks confidently and casually. the street "
               "is dampand reflective, creating a mirror effect of thecolorful lights. many pedestrians walk about.")
NEGATIVE_CLEAN = ("worst quality, normal quality, low quality, low res, blurry, artifacts, grainy, watermark, banner, "
                  "cropped, out of frame, out of focus, bad anatomy, bad proportions, deformed, disconnected limbs, "
                  "disfigured, username, error, sketch, duplicate, ugly, monochrome, horror, geometry, mutation, "
                  "disgusting, overexposed, underexposed.")

GOLDEN = [
    ("Check https://example.com/page.html now", "check html now"),
    ("visit www.site.org/x today", "visit today"),
    ("<b>Bold</b> text by @user_1", "bold text by"),
    ("a cat 中文 in a box", "a cat in a box"),
    ("a  b \u2014 c \u201cq\u201d \u2018s\u2019", "a b - c \"q\" 's"),  # one trailing ' dropped
    ("tag #123 and #12345 and 1234567 stay?", "tag and and stay?"),
    ("see foo.jpg and bar.mp4", "see and"),
    ("a shipping container, free download", "a container"),
    ("wallpaper 1920x1080 hd", "wallpaper hd"),
    ("'quoted caption'", "quoted caption"),
    ("- leading dash and trailing:", "leading dash and trailing"),
    ("this-is-my-cute-cat", "this is my cute cat"),
    ("a dog_and_a cat", "a dog_and_a cat"),
    ("ip 192.168.0.1 here", "ip here"),
    ("model jc6640 and j2d1a2a", "model and"),
    ("click for details please", "please"),
    ("page 12 of the book", "of the book"),
    ("x &amp; y &quot;z&quot;", 'x y "z"'),  # the HTML pass decodes &quot; first
    ("word,word.word", "word, word. word"),
    ("<person> walks", "person walks"),
    ("stars *** and ~~~ (here) [there]", "stars and here there"),
    ("chasing something.Its eyes are wide", "chasing eyes are wide"),  # ".it" TLD quirk, kept
    ("Jpeg artifacts", "artifacts"),
    (".hidden", ""),
    ("", ""),
]


@pytest.mark.parametrize("raw,expected", GOLDEN)
def test_clean_caption_golden(raw, expected):
    assert clean_caption(raw) == expected


def test_v15_template_gives_the_spec_strings():
    positive, negative = apply_prompt_template(TOKYO)
    assert clean_caption(positive) == TOKYO_CLEAN
    assert clean_caption(negative) == NEGATIVE_CLEAN
    assert positive.startswith("\n            high quality, ")


def test_user_negative_prompt_is_appended_without_separator():
    _, negative = apply_prompt_template("a cat", "Extra Bad")
    # "underexposed.Extra" -> the punctuation rule inserts a space after the dot.
    assert clean_caption(negative) == NEGATIVE_CLEAN + " extra bad"


def test_other_versions_use_the_plain_prompt():
    assert apply_prompt_template("A Cat", None, version="none") == ("A Cat", "")


def test_cleaning_twice_is_stable_on_typical_captions():
    for text in (TOKYO_CLEAN, NEGATIVE_CLEAN, "a red fox trots across a snowy meadow at sunrise."):
        assert clean_caption(text) == text


def test_without_ftfy_ordinary_text_is_unchanged(monkeypatch):
    monkeypatch.setattr(preprocess, "ftfy", None)
    for raw, expected in GOLDEN:
        assert clean_caption(raw) == expected
    assert clean_caption("\ufb01ne \uff26\uff35\uff2c\uff2c width") == "fine full width"
