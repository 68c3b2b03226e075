"""State merging: edit distance against a reference DP, cosine similarity, the resample policy."""

import math

import numpy as np
import pytest

from alphallm_jax.search.mcts_config import MCTSConfig
from alphallm_jax.search.merging import MergePolicy, OptionSample, cosine_similarity, edit_distance


def reference_edit_distance(a: str, b: str) -> int:
    """Textbook Wagner-Fischer dynamic programme."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        row = [i]
        for j, cb in enumerate(b, start=1):
            row.append(min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = row
    return prev[-1]


def random_string(rng, alphabet: str, max_len: int) -> str:
    return "".join(rng.choice(list(alphabet), size=int(rng.integers(0, max_len + 1))))


@pytest.mark.parametrize("a,b,d", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("", "", 0),
                                   ("flaw", "lawn", 2), ("same", "same", 0), ("a", "b", 1), ("ab", "ba", 2)])
def test_edit_distance_known_values(a, b, d):
    assert edit_distance(a, b) == d


def test_edit_distance_matches_reference_dp_on_random_strings():
    rng = np.random.default_rng(0)
    for alphabet, max_len in [("ab", 12), ("abcd", 30), ("xyz é∑😀\n", 40), ("0123456789 +=<>", 90)]:
        for _ in range(150):
            a, b = random_string(rng, alphabet, max_len), random_string(rng, alphabet, max_len)
            assert edit_distance(a, b) == reference_edit_distance(a, b), (a, b)


def test_edit_distance_on_long_strings_beyond_one_machine_word():
    rng = np.random.default_rng(1)
    for _ in range(5):
        a = random_string(rng, "abcdefgh", 300)
        b = list(a)
        for _ in range(int(rng.integers(0, 40))):  # a few random edits keep the strings related
            pos = int(rng.integers(0, len(b) + 1))
            op = rng.integers(0, 3)
            if op == 0:
                b.insert(pos, "z")
            elif op == 1 and pos < len(b):
                del b[pos]
            elif pos < len(b):
                b[pos] = "y"
        b = "".join(b)
        assert edit_distance(a, b) == reference_edit_distance(a, b)


def test_edit_distance_cap_returns_min_of_distance_and_cap():
    rng = np.random.default_rng(2)
    for _ in range(300):
        a, b = random_string(rng, "abc", 25), random_string(rng, "abc", 25)
        cap = int(rng.integers(1, 15))
        assert edit_distance(a, b, max_distance=cap) == min(reference_edit_distance(a, b), cap)


def test_cosine_similarity():
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(1.0)
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert cosine_similarity(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine_similarity(np.zeros(3), np.ones(3)) == 0.0
    with pytest.raises(ValueError):
        cosine_similarity(np.ones(2), np.ones(3))


def samples(*texts):
    return [OptionSample(t) for t in texts]


def test_edit_policy_accepts_distinct_and_resamples_near_duplicates():
    policy = MergePolicy("edit", threshold=5, max_resample=2)
    siblings = samples("the first step is long\n")
    assert policy.decide(samples("anything"), []).action == "accept"  # no siblings
    assert policy.decide(samples("a completely different line\n"), siblings).action == "accept"
    assert policy.decide(samples("the first step is lon\n"), siblings).action == "resample"  # distance 1
    # Exactly at the threshold is not a duplicate (duplicate means distance < threshold).
    siblings = samples("abcdefghij\n")
    assert reference_edit_distance("vwxyzfghij\n", "abcdefghij\n") == 5
    assert policy.decide(samples("vwxyzfghij\n"), siblings).action == "accept"
    assert policy.decide(samples("vwxyefghij\n"), siblings).action == "resample"


def test_edit_policy_keeps_the_most_distant_sample_after_max_resample():
    policy = MergePolicy("edit", threshold=10, max_resample=2)
    siblings = samples("aaaaaaaaaa", "bbbbbbbbbb")
    tries = samples("aaaaaaaaab", "aaaaaabbbb", "aaaaaaaabb")  # distances to nearest sibling: 1, 4, 2
    assert policy.decide(tries[:1], siblings).action == "resample"
    assert policy.decide(tries[:2], siblings).action == "resample"
    decision = policy.decide(tries, siblings)
    assert (decision.action, decision.index) == ("keep", 1)
    # A later sample that is not a duplicate is accepted rather than the most distant old one.
    assert policy.decide([*tries[:2], OptionSample("cccccccccccc")], siblings).index == 2


def test_zero_resamples_keeps_the_first_sample_at_once():
    policy = MergePolicy("edit", threshold=10, max_resample=0)
    decision = policy.decide(samples("aaaa"), samples("aaab"))
    assert (decision.action, decision.index) == ("keep", 0)


def test_cosine_policy_uses_similarity_threshold():
    policy = MergePolicy("cosine", threshold=0.7, max_resample=5)
    sib = [OptionSample("x", np.array([1.0, 0.0]))]
    assert policy.decide([OptionSample("y", np.array([1.0, 0.1]))], sib).action == "resample"
    assert policy.decide([OptionSample("y", np.array([0.0, 1.0]))], sib).action == "accept"
    with pytest.raises(ValueError, match="embedding"):
        policy.decide([OptionSample("y")], sib)


def test_merging_off_accepts_everything():
    policy = MergePolicy.from_config(MCTSConfig(merge_distance="none"))
    assert policy.decide(samples("same"), samples("same")).action == "accept"
