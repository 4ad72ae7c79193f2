import json

from captioner.vocab import Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("  A Dog, running!  On the BEACH. ") == ["a", "dog", "running", "on", "the", "beach"]
    assert tokenize("...") == []


def test_specials_have_fixed_ids():
    v = Vocabulary.build(["a cat", "a dog"], min_count=1)
    assert [v.itos[i] for i in range(4)] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (v.pad_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)


def test_min_count_maps_rare_words_to_unk():
    caps = ["a dog runs"] * 5 + ["a zebra runs"] * 4
    v = Vocabulary.build(caps, min_count=5)
    assert "dog" in v.stoi and "zebra" not in v.stoi
    assert v.encode("a zebra")[1:-1] == [v.stoi["a"], v.unk_id]
    assert v.itos[4] == "a"  # most frequent first


def test_encode_decode_round_trip():
    v = Vocabulary.build(["A man rides a horse.", "a man on a horse"], min_count=1)
    ids = v.encode("A man, on a HORSE!")
    assert ids[0] == v.start_id and ids[-1] == v.end_id
    assert v.decode(ids) == "a man on a horse"
    assert v.decode([v.start_id, v.stoi["man"], v.end_id, v.stoi["horse"]]) == "man"  # stops at <end>


def test_json_round_trip():
    v = Vocabulary.build(["a man rides a horse", "a dog"], min_count=1)
    back = Vocabulary.from_dict(json.loads(json.dumps(v.to_dict())))
    assert back == v and back.min_count == 1
    assert back.encode("a dog rides") == v.encode("a dog rides")
