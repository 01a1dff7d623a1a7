"""Domain errors that carry their own HTTP meaning.

Deterministic problems are 4xx so clients do not retry them; transient ones
are 503 with a Retry-After so they do. No web framework is imported here: the
HTTP layer renders any `ServiceError` as the OpenAI error envelope.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: a message for the user plus the HTTP status and OpenAI error type."""

    status_code = 500
    error_type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict:
        """The OpenAI error envelope for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ServiceError):
    status_code = 400
    error_type = "invalid_request_error"


class Unauthorized(ServiceError):
    status_code = 401
    error_type = "authentication_error"


class ModelNotFound(ServiceError):
    status_code = 404
    error_type = "invalid_request_error"


class NotFound(ServiceError):
    status_code = 404
    error_type = "invalid_request_error"


class MethodNotAllowed(ServiceError):
    status_code = 405
    error_type = "invalid_request_error"


class PayloadTooLarge(ServiceError):
    status_code = 413
    error_type = "invalid_request_error"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    error_type = "invalid_request_error"


class ClientClosed(ServiceError):
    """The client left before its request was read whole: counted as 499, not as a fault."""

    status_code = 499
    error_type = "invalid_request_error"


class Overloaded(ServiceError):
    status_code = 503
    error_type = "overloaded_error"


class ModelUnavailable(ServiceError):
    """The model cannot answer now: it failed to load, or did not answer in time."""

    status_code = 503
    error_type = "service_unavailable_error"


class ModelLoadError(Exception):
    """A model cannot be found or loaded; raised at start-up, before serving."""


class ModelOutputError(ServiceError):
    """The model gave vectors that cannot be used (inf or NaN): the operator must act.

    A 500, not a 4xx: the input is fine, the model's run of it is not. `rows` are the
    positions, among the texts of the one call, whose vectors failed: a pass shared by
    several requests fails only those that hold one.
    """

    rows: tuple[int, ...] = ()
    dtype: str = ""
    device: str = ""

    @classmethod
    def not_finite(cls, rows, dtype: str, device: str) -> ModelOutputError:
        texts = "a text" if len(rows) == 1 else f"{len(rows)} texts"
        if dtype == "float16":
            why = (
                "some of this model's activations outgrow float16's range (65,504) on some "
                "texts, as Qwen-family models' do. The operator should set dtype: bfloat16 "
                "where the hardware runs it, or float32"
            )
        else:
            why = "its weights may be damaged. The operator should check the model's files"
        error = cls(
            f"The model gave inf or NaN values for {texts}, running in {dtype} on {device}: "
            f"{why}. Nothing was returned or stored.",
            code="model_output_not_finite",
        )
        error.rows, error.dtype, error.device = tuple(rows), dtype, device
        return error

    def for_rows(self, rows) -> ModelOutputError:
        """The same failure, for some of the rows (renumbered by the caller)."""
        return self.not_finite(rows, self.dtype, self.device)
