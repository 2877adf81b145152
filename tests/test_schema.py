"""Schemathesis over /openapi.json (issue 20): requests generated from the API's own schema (valid
ones and ones that break it), sent to the app in-process on the echo engine, as the keyless
operator and with a user's key. Whatever comes in, no answer is a server error (5xx) and every
error has OpenAI's shape."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from serving.api import create_app
from serving.service import LOCAL_ADMIN
from trainer.cycle import CycleConfig
from trainer.lora import TrainingConfig

EXAMPLES = int(os.environ.get("RATCHET_SCHEMA_EXAMPLES", "20"))  # generated requests per operation and mode
FAST = CycleConfig(training=TrainingConfig(epochs=1, min_steps=0, batch_size=4, r=4), anchors=False,
                   gate_enabled=False)
LOCAL = "http://127.0.0.1"


def problem(response) -> str | None:
    """Why the answer breaks the contract: a server error, or an error not in OpenAI's shape."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        try:
            body = response.json()
            error = body["error"]
        except (ValueError, KeyError, TypeError):
            return f"{response.status_code} not OpenAI-shaped: {response.text[:300]}"
        if set(body) != {"error"} or set(error) != {"message", "type", "param", "code"} or not error["message"]:
            return f"{response.status_code} not OpenAI-shaped: {response.text[:300]}"
    return None


@pytest.mark.parametrize("with_key", [False, True], ids=["keyless", "user-key"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_generated_request_gets_a_server_error_or_a_bare_error(start_ratchet, mode, with_key):
    r = start_ratchet(cycle=FAST)
    app = create_app(r)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"host": "127.0.0.1"})
    headers = {"Authorization": f"Bearer {r.create_key(LOCAL_ADMIN, 'ann')[1]}"} if with_key else {}
    problems: dict[str, str] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            try:
                why = problem(case.call(base_url=LOCAL, headers=headers))
            except Exception as e:  # noqa: BLE001  (raised through the in-process transport: a 500 on a server)
                why = f"the app raised {type(e).__name__}: {e}"
            if why:
                problems.setdefault(operation.label, f"{case.method} {case.formatted_path} query={case.query} "
                                                     f"body={str(case.body)[:200]!r} -> {why}")

        try:
            fuzz()
        except Unsatisfiable:  # an operation without parameters or body has nothing to break
            assert mode == GenerationMode.NEGATIVE, operation.label
        except Exception as e:  # noqa: BLE001  (a schema schemathesis cannot generate from is a finding too)
            problems.setdefault(operation.label, f"could not test: {type(e).__name__}: {str(e)[:300]}")
    assert operations >= 20
    assert not problems, "\n".join(f"{label}: {why}" for label, why in problems.items())
