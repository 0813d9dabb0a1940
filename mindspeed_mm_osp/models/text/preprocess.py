"""Caption cleaning and the v1.5 prompt template.

`clean_caption` reproduces the PixArt/DeepFloyd cleaner that Open-Sora Plan applies to
training captions and inference prompts (docs/model.md, "Text encoders"), so that text seen at inference
tokenises like text seen in training. It is pure and deterministic. Known quirks are kept
on purpose because the released weights were trained on their output: "jpeg artifacts"
becomes "artifacts", the words "shipping"/"download" vanish anywhere, and "something.its"
is taken for a URL with the ".it" domain.

Two reference dependencies are replaced: HTML tags are stripped with the standard
library's `html.parser` (the parser BeautifulSoup was configured with in the reference),
and `ftfy.fix_text` is used when `ftfy` is installed; without it only the NFC
normalisation, ligature, full-width and control-character fixes that it applies to
ordinary text are done (mojibake repair needs `ftfy`). Checked against the reference
code on 20k random captions: identical except when a `<script>` or `<!--` is left
unterminated at the end of a caption.
"""

from __future__ import annotations

import html
import html.entities
import re
import unicodedata
import urllib.parse
from html.parser import HTMLParser

try:
    import ftfy
except ImportError:  # optional: see module docstring
    ftfy = None

_URL_TAIL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_FILE_EXT = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"

# (pattern, replacement) applied in order before the HTML pass.
_URL_RULES = (
    (re.compile(r"<person>"), "person"),
    (re.compile(r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL + r"))"), ""),
    # The reference's second URL rule spells "www:" (with a colon); kept as is.
    (re.compile(r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL + r"))"), ""),
)

# Between the HTML pass and the ftfy/unescape pass.
_SYMBOL_RULES = (
    (re.compile(r"@[\w\d]+\b"), ""),
    # CJK strokes, katakana extensions, enclosed CJK, CJK compatibility, ext. A, Yijing and unified
    # ideographs (the reference's `support_chinese` is never switched on). The reference deletes these seven
    # adjacent blocks one after the other; deleting their union U+31C0-U+9FFF at once gives the same text.
    (re.compile(r"[\u31c0-\u9fff]+"), ""),
    (re.compile(
        r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40"
        r"\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+"), "-"),
    (re.compile("[`\u00b4\u00ab\u00bb\u201c\u201d\u00a8]"), '"'),
    (re.compile("[\u2018\u2019]"), "'"),
    (re.compile(r"&quot;?"), ""),
    (re.compile(r"&amp"), ""),
    (re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"), " "),
    (re.compile(r"\d:\d\d\s+$"), ""),
    (re.compile(r"\\n"), " "),
    (re.compile(r"#\d{1,3}\b"), ""),
    (re.compile(r"#\d{5,}\b"), ""),
    (re.compile(r"\b\d{6,}\b"), ""),
    (re.compile(r"[\S]+\." + _FILE_EXT), ""),
    (re.compile(r"[\"']{2,}"), '"'),
    (re.compile(r"[\.]{2,}"), " "),
    (re.compile("[#\u00ae\u2022\u00a9\u2122&@\u00b7\u00ba\u00bd\u00be\u00bf\u00a1\u00a7~)(\\]\\[}{|\\\\/*]+"), " "),
    (re.compile(r"\s+\.\s+"), " "),
)

_DASH_OR_UNDERSCORE = re.compile(r"[-_]")

# After the ftfy/unescape pass.
_WORD_RULES = (
    (re.compile(r"\b[a-zA-Z]{1,3}\d{3,15}\b"), ""),
    (re.compile(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b"), ""),
    (re.compile(r"\b\d+[a-zA-Z]+\d+\b"), ""),
    (re.compile(r"(worldwide\s+)?(free\s+)?shipping"), ""),
    (re.compile(r"(free\s)?download(\sfree)?"), ""),
    (re.compile(r"\bclick\b\s(?:for|on)\s\w+"), ""),
    (re.compile(r"\b" + _FILE_EXT + r"(\simage[s]?)?"), ""),
    (re.compile(r"\bpage\s+\d+\b"), ""),
    (re.compile(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b"), " "),
    (re.compile("\\b\\d+\\.?\\d*[x\u0445\u00d7]\\d+\\.?\\d*\\b"), ""),
    (re.compile(r"\b\s+\:\s+"), ": "),
    (re.compile(r"(\D[,\./])\b"), r"\1 "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"^[\"']([\w\W]+)[\"']$"), r"\1"),
    (re.compile(r"^['_,\-:;]"), ""),
    (re.compile(r"['_,\-:+]$"), ""),
    (re.compile(r"^\.\S+$"), ""),
)

# ftfy's default fixes that matter for ordinary text, for when ftfy is absent.
_LIGATURES = {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "st", "\ufb06": "st"}
_FULLWIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")


# Named references as BeautifulSoup resolves them: HTML5 names, trailing ";" optional,
# the first spelling in sorted order wins; unknown names stay literal without their ";".
_ENTITIES: dict[str, str] = {
    name.removesuffix(";"): char for name, char in sorted(html.entities.html5.items(), reverse=True)}


class _TextOnly(HTMLParser):
    """The text of an HTML fragment as BeautifulSoup(html.parser).text gives it: tags,
    comments and the bodies of script/style/template dropped, references resolved."""

    _SKIPPED = frozenset({"script", "style", "template"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.parts: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        self._skip_depth += tag in self._SKIPPED

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIPPED and self._skip_depth:
            self._skip_depth -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self.parts.append(data)

    def handle_entityref(self, name: str) -> None:
        self.handle_data(_ENTITIES.get(name, "&" + name))

    def handle_charref(self, name: str) -> None:
        self.handle_data(html.unescape(f"&#{name};"))


def _strip_html(text: str) -> str:
    parser = _TextOnly()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def _fix_text(text: str) -> str:
    if ftfy is not None:
        return ftfy.fix_text(text)
    text = "".join(_LIGATURES.get(c, c) for c in text).translate(_FULLWIDTH)
    return unicodedata.normalize("NFC", _CONTROL_CHARS.sub("", text))


def _apply(rules, text: str) -> str:
    for pattern, repl in rules:
        text = pattern.sub(repl, text)
    return text


def _clean_once(caption: str) -> str:
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = _apply(_URL_RULES, text)
    text = _strip_html(text)
    text = _apply(_SYMBOL_RULES, text)
    if len(_DASH_OR_UNDERSCORE.findall(text)) > 3:  # this-is-a-slug / this_is_a_slug
        text = _DASH_OR_UNDERSCORE.sub(" ", text)
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return _apply(_WORD_RULES, text).strip()


def clean_caption(text: str) -> str:
    """The reference cleaner applied twice, as both training and inference do."""
    return _clean_once(_clean_once(text))


PROMPT_VERSION = "v1.5"  # the prompt template of Open-Sora Plan v1.5 (`apply_prompt_template`)

# v1.5 templates, byte for byte (newline + 12-space indentation included): cleaning turns
# them into the release's strings, e.g. "high quality, <prompt>".
_POSITIVE_TEMPLATE_V15 = "\n            high quality, {}\n            "
_NEGATIVE_TEMPLATE_V15 = (
    "\n            Worst quality, Normal quality, Low quality, Low res, Blurry, Jpeg artifacts, Grainy, watermark, banner, \n"
    "            Cropped, Out of frame, Out of focus, Bad anatomy, Bad proportions, Deformed, Disconnected limbs, Disfigured, \n"
    "            username, error, sketch, duplicate, ugly, monochrome, horror, geometry, mutation, disgusting, overexposed, underexposed.\n"
    "            "
)


def apply_prompt_template(prompt: str, negative_prompt: str | None = None, version: str = "v1.5") -> tuple[str, str]:
    """(positive, negative) texts before cleaning.

    For "v1.5" the prompt is wrapped as "high quality, <prompt>" and the user's negative
    prompt is appended to the fixed v1.5 negative text with no separator, as the reference
    does. Other versions use the prompt unchanged and the user's negative prompt only.
    """
    negative_prompt = negative_prompt or ""
    if version == "v1.5":
        return _POSITIVE_TEMPLATE_V15.format(prompt), _NEGATIVE_TEMPLATE_V15 + negative_prompt
    return prompt, negative_prompt


def sampler_texts(prompt: str, negative_prompt: str | None = None, version: str = PROMPT_VERSION) -> tuple[str, str]:
    """(positive, negative) texts exactly as the sampler encodes them: the version's template, then cleaning."""
    positive, negative = apply_prompt_template(prompt, negative_prompt, version)
    return clean_caption(positive), clean_caption(negative)
