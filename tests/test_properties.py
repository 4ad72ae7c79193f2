"""Property-based tests: the tokenizer, the vocabulary and the dataset loaders on arbitrary
Unicode text and arbitrary JSON shapes. Loaders must either load or raise DataError: never crash."""

import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captioner.cjk import join_words
from captioner.data import DataError, load_coco, load_coco_references, load_karpathy, load_sequences, read_json
from captioner.vocab import Vocabulary, tokenize

SETTINGS = settings(
    max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 150)),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ids = st.integers(-3, 5) | st.text(max_size=3) | json_values
coco_like = st.fixed_dictionaries(
    {
        "images": st.lists(
            st.fixed_dictionaries({}, optional={"id": ids, "file_name": st.text(max_size=6) | json_values}), max_size=5
        )
        | json_values,
        "annotations": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "id": ids,
                    "image_id": ids,
                    "sequence_id": ids,
                    "caption": st.text(max_size=20) | json_values,
                },
            ),
            max_size=6,
        ),
    },
    optional={
        "sequences": st.lists(
            st.fixed_dictionaries({}, optional={"id": ids, "image_ids": st.lists(ids, max_size=4) | json_values}),
            max_size=4,
        )
        | json_values
    },
)
karpathy_like = st.fixed_dictionaries(
    {
        "images": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "filename": st.text(max_size=6) | json_values,
                    "filepath": st.text(max_size=4) | json_values,
                    "split": st.sampled_from(["train", "val"]) | json_values,
                    "sentences": st.lists(
                        st.fixed_dictionaries(
                            {},
                            optional={
                                "raw": st.text(max_size=10) | json_values,
                                "tokens": st.lists(st.text(max_size=5)) | json_values,
                            },
                        ),
                        max_size=3,
                    )
                    | json_values,
                },
            ),
            max_size=4,
        )
        | json_values
    }
)


@SETTINGS
@given(st.text())
def test_tokens_are_lower_case_words_without_spaces(text):
    tokens = tokenize(text)
    assert all(t and not any(c.isspace() for c in t) and t == t.lower() for t in tokens)


@SETTINGS
@given(st.lists(st.text(max_size=40), min_size=1, max_size=8))
def test_vocabulary_round_trips_text_and_json(captions):
    vocab = Vocabulary.build(captions, min_count=1)
    for c in captions:
        assert vocab.decode(vocab.encode(c)) == join_words(tokenize(c))  # every word known: nothing lost
    assert Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab


def _load_all(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.json"
        path.write_text(json.dumps(data))
        for load in (
            lambda: load_coco(path, d),
            lambda: load_coco(path, d, skip_missing=True, skip_bad=True),
            lambda: load_sequences(path, d, skip_missing=True, skip_bad=True),
            lambda: load_sequences(path, d),
            lambda: load_coco_references(path),
            lambda: load_karpathy(path, d, "train", skip_missing=True),
        ):
            try:
                load()
            except DataError as e:
                assert str(e).startswith(str(path)) and "\n" not in str(e)


@SETTINGS
@given(coco_like)
def test_coco_and_sequence_shaped_files_load_or_are_refused_clearly(data):
    _load_all(data)


@SETTINGS
@given(karpathy_like | json_values)
def test_any_json_loads_or_is_refused_clearly(data):
    _load_all(data)


@SETTINGS
@given(st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
def test_any_bytes_read_as_json_or_are_refused_clearly(raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.json"
        path.write_bytes(raw)
        try:
            read_json(path)
        except DataError as e:
            assert str(path) in str(e)
