

def test_mcnemar_counts_discordant_prompts_and_gives_an_exact_p():
    from pocketdiff.eval.quality import mcnemar

    a = [True] * 10 + [False] * 2 + [True] * 5
    b = [False] * 10 + [True] * 2 + [True] * 5
    r = mcnemar(a, b)
    assert (r["only_a"], r["only_b"]) == (10, 2)
    assert abs(r["p_value"] - 0.0386) < 1e-3  # 2 * P(X <= 2), X ~ Bin(12, 0.5)
    assert mcnemar(a, a)["p_value"] == 1.0
