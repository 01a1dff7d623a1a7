"""A deterministic corpus of legal, support and research sentences, English and Chinese."""

from __future__ import annotations

import random

SUBJECTS = [
    "The tenant", "The landlord", "Either party", "The supplier", "The customer",
    "Our support team", "The licensee", "The research group", "The employer", "The court",
]
VERBS = [
    "may terminate", "shall notify", "must pay", "cannot assign", "will review",
    "should document", "agrees to indemnify", "is required to report", "may request", "shall deliver",
]
OBJECTS = [
    "the agreement", "the monthly rent", "all outstanding invoices", "the confidential information",
    "a written notice", "the refund request", "the warranty claim", "the experimental results",
    "the password reset link", "the annual compliance report",
]
TAILS = [
    "within thirty days.", "before the end of the quarter.", "without prior written consent.",
    "in accordance with section 12.", "as soon as reasonably practicable.",
    "unless otherwise agreed in writing.", "after the probation period ends.",
    "if the product fails during the warranty period.", "to the account on file.", "at its own expense.",
]
CHINESE = [
    "租户应于每月第一天支付租金。", "任何一方可提前三十天书面通知终止本合同。",
    "客户可在保修期内申请退款。", "研究小组须在季度末提交实验结果。",
    "未经书面同意，被许可方不得转让本协议。", "如何重置我的账户密码？",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` distinct sentences of 6 to 60 words; about one in six is Chinese."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if rng.random() < 1 / 6:
            text = rng.choice(CHINESE) + rng.choice(CHINESE)[: rng.randint(2, 12)]
        else:
            parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(TAILS)]
            extra = " ".join(rng.choice(TAILS) for _ in range(rng.randint(0, 4)))
            text = " ".join(parts) + (" " + extra if extra else "")
        out.append(f"{text} (#{i})")
    return out


def short_texts(n: int, seed: int = 1) -> list[str]:
    """Distinct short questions, one per latency sample (no cache can answer a repeat)."""
    rng = random.Random(seed)
    starts = ["How do I renew", "Can I cancel", "When must I send", "Who approves"]
    return [f"{rng.choice(starts)} {rng.choice(OBJECTS)} #{i}?" for i in range(n)]
