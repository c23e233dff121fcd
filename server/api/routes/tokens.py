"""A user's API tokens: list, mint from the browser (for `hivewire login --token`), revoke."""

from __future__ import annotations

from fastapi import APIRouter

from hivewire_server import accounts
from hivewire_server.api.deps import CurrentUser, SessionDep
from hivewire_server.schemas import TokenCreate, TokenCreated, TokenPublic, TokensPublic

router = APIRouter(prefix="/api/tokens", tags=["tokens"])


@router.get("")
async def list_tokens(user: CurrentUser, session: SessionDep) -> TokensPublic:
    rows = await accounts.list_api_tokens(session, user=user)
    return TokensPublic(data=[TokenPublic.model_validate(row) for row in rows], count=len(rows))


@router.post("", status_code=201)
async def create_token(body: TokenCreate, user: CurrentUser, session: SessionDep) -> TokenCreated:
    row, token = await accounts.create_api_token(session, user=user, name=body.name)
    return TokenCreated(**TokenPublic.model_validate(row).model_dump(), token=token)


@router.delete("/{token_id}")
async def revoke_token(token_id: int, user: CurrentUser, session: SessionDep) -> TokenPublic:
    return TokenPublic.model_validate(await accounts.revoke_api_token(session, user=user, token_id=token_id))
