"""The platform's error answers, in both dialects: native DashScope and OpenAI-compatible."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

_FREE_TIER_MESSAGE: Final = (
    "The free tier of the model has been exhausted. If you wish to continue access the model "
    'on a paid basis, please disable the "use free tier only" mode in the management console.'
)
_ARREARAGE_MESSAGE: Final = "Access denied, please make sure your account is in good standing."
_DOCS: Final = "https://help.aliyun.com/zh/model-studio/error-code"


@dataclass(frozen=True)
class _ErrorKind:
    status: int
    message: str
    compat_code: str
    compat_type: str
    compat_message: str


_ERRORS: Final[dict[str, _ErrorKind]] = {
    "AllocationQuota.FreeTierOnly": _ErrorKind(
        403,
        _FREE_TIER_MESSAGE,
        "AllocationQuota.FreeTierOnly",
        "AllocationQuota.FreeTierOnly",
        _FREE_TIER_MESSAGE,
    ),
    "Arrearage": _ErrorKind(
        400,
        _ARREARAGE_MESSAGE,
        "Arrearage",
        "Arrearage",
        f"{_ARREARAGE_MESSAGE} For details, see: {_DOCS}#overdue-payment",
    ),
    "PrepaidBillOverdue": _ErrorKind(
        400,
        "The prepaid bill is overdue.",
        "PrepaidBillOverdue",
        "PrepaidBillOverdue",
        "The prepaid bill is overdue.",
    ),
    "PostpaidBillOverdue": _ErrorKind(
        400,
        "The postpaid bill is overdue.",
        "PostpaidBillOverdue",
        "PostpaidBillOverdue",
        "The postpaid bill is overdue.",
    ),
    "InvalidApiKey": _ErrorKind(
        401,
        "Invalid API-key provided.",
        "invalid_api_key",
        "invalid_request_error",
        f"Incorrect API key provided. For details, see: {_DOCS}#apikey-error",
    ),
    "Throttling.RateQuota": _ErrorKind(
        429,
        "Requests rate limit exceeded, please try again later.",
        "limit_requests",
        "limit_requests",
        f"You have exceeded your current request limit. For details, see: {_DOCS}#rate-limit",
    ),
    "Throttling.AllocationQuota": _ErrorKind(
        429,
        "Allocated quota exceeded, please increase your quota limit.",
        "insufficient_quota",
        "insufficient_quota",
        "You exceeded your current quota, please check your plan and billing details. "
        f"For details, see: {_DOCS}#token-limit",
    ),
    "InvalidParameter": _ErrorKind(
        400,
        "The request is invalid.",
        "invalid_parameter_error",
        "invalid_request_error",
        "The request is invalid.",
    ),
    "InternalError": _ErrorKind(
        500,
        "An internal error has occured, please try again later.",
        "internal_error",
        "internal_error",
        "An internal error has occured, please try again later.",
    ),
}


@dataclass(frozen=True)
class _Refusal:
    """One error answer, in both dialects."""

    code: str
    status: int
    message: str
    compat_code: str
    compat_type: str
    compat_message: str
    in_stream_after: int | None = None

    @staticmethod
    def of(
        code: str,
        status: int | None = None,
        message: str | None = None,
        in_stream_after: int | None = None,
    ) -> _Refusal:
        kind = _ERRORS.get(code)
        if kind is None:
            if status is None:
                known = ", ".join(sorted(_ERRORS))
                raise ValueError(f"unknown error code {code!r}: pass status= (known: {known})")
            kind = _ErrorKind(status, message or code, code, code, message or code)
        return _Refusal(
            code=code,
            status=kind.status if status is None else status,
            message=kind.message if message is None else message,
            compat_code=kind.compat_code,
            compat_type=kind.compat_type,
            compat_message=kind.compat_message if message is None else message,
            in_stream_after=in_stream_after,
        )

    def native_body(self, request_id: str) -> dict[str, Any]:
        return {"request_id": request_id, "code": self.code, "message": self.message}

    def compat_body(self, request_id: str) -> dict[str, Any]:
        error = {
            "message": self.compat_message,
            "type": self.compat_type,
            "param": None,
            "code": self.compat_code,
        }
        return {"error": error, "request_id": request_id}


@dataclass
class _PendingFailure:
    refusal: _Refusal
    remaining: int


class _HttpError(Exception):
    def __init__(self, refusal: _Refusal) -> None:
        super().__init__(refusal.code)
        self.refusal = refusal


def _bad_request(message: str) -> _HttpError:
    return _HttpError(_Refusal.of("InvalidParameter", message=message))


def _not_found(message: str) -> _HttpError:
    return _HttpError(_Refusal.of("NotFound", status=404, message=message))
