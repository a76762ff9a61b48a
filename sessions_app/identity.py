"""Who is talking: a Principal (authenticated credential) and the Author stamped on events."""

from dataclasses import dataclass, field

from sessions_app import event_types as et


@dataclass(frozen=True, slots=True)
class Author:
    kind: str
    id: str
    name: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "id": self.id, "name": self.name}


SYSTEM = Author(kind=et.KIND_SYSTEM, id="baton", name="Baton")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `session_id` None means any session (agent keys, operators)."""

    kind: str
    id: str
    name: str
    credential: str  # "agent_key" | "client_token" | "session"
    capabilities: frozenset[str] = field(default_factory=lambda: frozenset(et.CAPABILITIES))
    session_id: str | None = None
    user_id: int | None = None
    is_authenticated: bool = True  # lets DRF treat this as request.user

    @property
    def author(self) -> Author:
        return Author(kind=self.kind, id=self.id, name=self.name)

    @property
    def is_operator(self) -> bool:
        return self.kind == et.KIND_OPERATOR

    @property
    def sees_private(self) -> bool:
        """Operators see internal notes and diagnostics; users and agents never do."""
        return self.is_operator

    @property
    def is_global(self) -> bool:
        return self.session_id is None

    def can(self, capability: str, session_id: str) -> bool:
        if self.session_id is not None and self.session_id != session_id:
            return False
        return capability in self.capabilities
