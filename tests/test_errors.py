"""The error tree: every RpcStatus code reaches callers as its own typed error."""

from __future__ import annotations

import pytest

import multillm
from multillm.errors import Code, RpcError, code_name
from multillm.mock_llm import MockControl
from multillm.producers import Client, make_request
from multillm.schemas import RpcStatus
from tests.conftest import StartWorker


@pytest.mark.parametrize("code", list(Code), ids=lambda c: c.name)
def test_every_code_has_its_own_exported_error(code: Code) -> None:
    error = RpcError.from_status(RpcStatus(code=code, message="why"))
    assert type(error) is not RpcError
    assert isinstance(error, RpcError) and error.code == code
    # Exported from the package, named after the code (PERMISSION_DENIED -> PermissionDenied).
    assert type(error).__name__ == code.name.title().replace("_", "")
    assert getattr(multillm, type(error).__name__) is type(error)
    assert str(error) == f"[{code.name}] why"


def test_an_unknown_code_is_a_bare_rpc_error_named_by_its_number() -> None:
    error = RpcError.from_status(RpcStatus(code=99, message="?"))
    assert type(error) is RpcError and str(error) == "[99] ?"
    assert (code_name(14), code_name(99), code_name("14"), code_name(None)) == ("UNAVAILABLE", "99", "14", "None")


def test_the_public_surface_is_explicit_and_sorted() -> None:
    assert multillm.__all__ == sorted(multillm.__all__)
    assert {"Code", "NotFound", "PermissionDenied", "Unauthenticated"} <= set(multillm.__all__)
    assert all(hasattr(multillm, name) for name in multillm.__all__)


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [(401, multillm.Unauthenticated, Code.UNAUTHENTICATED), (403, multillm.PermissionDenied, Code.PERMISSION_DENIED)],
    ids=["401", "403"],
)
def test_a_provider_refusing_the_key_raises_a_typed_error(
    start_worker: StartWorker, client: Client, mock_control: MockControl, status: int, error: type[RpcError], code: Code
) -> None:
    start_worker("primary")
    mock_control.set_fault("locked", always=status)
    with pytest.raises(error) as caught:
        client.create(make_request(["mock/locked"], "hello"), timeout=30)
    assert caught.value.code == code and "mock fault" in caught.value.message
