"""Stand-alone math-verify worker process (spawned by :mod:`alphallm_jax.data.grading`).

Protocol: one JSON object per line on stdin, ``{"id": int, "gold": str, "pred": str,
"timeout": int}``; one JSON object per line on stdout, ``{"id": int, "ok": bool}`` or
``{"id": int, "ok": false, "error": str}``. The first line written is ``{"ready": true}``.

The process runs math-verify in its own main thread, so math-verify's signal-based
timeouts work here; the parent additionally enforces a wall-clock budget and kills this
process when it is exceeded (sympy can block inside C code, where signals do not land).

This file imports nothing from the project so it starts fast and independently of how
the parent found the package. Model text is parsed by math-verify's LaTeX/sympy parser;
it is never passed to ``eval``/``exec``.
"""

from __future__ import annotations

import json
import logging
import sys


def verify_strings(gold: str, pred: str, timeout: int) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=timeout)
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def main() -> int:
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401  (import before announcing readiness)

    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            ok = verify_strings(req["gold"], req["pred"], int(req.get("timeout", 5)))
            resp = {"id": req["id"], "ok": ok}
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001  incl. math-verify's TimeoutException
            resp = {"id": req["id"], "ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        out.write(json.dumps(resp) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
