"""Write keys in Redis, shared by every ingest worker.

Keys are stored as sha256 hashes only. Redis holds the keys added at run time and the
revocations, so a key revoked on one worker is refused by all of them on their next request;
nothing is cached in a worker. Bootstrap keys from settings stay valid until their source
is revoked.

Admin commands (`touchstream keys ...`):

    touchstream keys add SOURCE      print a new write key for SOURCE (shown once, stored hashed)
    touchstream keys revoke SOURCE   refuse every key of SOURCE, bootstrap keys included
    touchstream keys list            sources with their key counts
"""

from __future__ import annotations

import argparse
import asyncio
import secrets

import redis.asyncio as aioredis

from services.ingest.settings import hash_write_key

# One hash holds the sha256 of every run-time key (-> its source) and, as "revoked:<source>"
# fields, the revoked sources; a hex digest never contains ":", so the two cannot collide.
# One hash means one command (HMGET) per request for both questions.
KEYS_HASH = "ts:in:keys"
REVOKED_FIELD = "revoked:"
KEY_PREFIX = "tsk_"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class WriteKeyStore:
    """Look write keys up, add and revoke them; bootstrap keys come from settings."""

    def __init__(self, redis: aioredis.Redis, bootstrap: dict[str, str] | None = None) -> None:
        self.redis = redis
        self._bootstrap_by_hash = {digest: source for source, digest in (bootstrap or {}).items()}

    async def source_for(self, key: str) -> str | None:
        """Return the source of write key `key`, or None if it is unknown or revoked (one command)."""
        digest = hash_write_key(key)
        bootstrap_source = self._bootstrap_by_hash.get(digest)
        if bootstrap_source is None:
            stored = await self.redis.hget(KEYS_HASH, digest)
            return None if stored is None else _text(stored)
        stored, revoked = await self.redis.hmget(KEYS_HASH, [digest, REVOKED_FIELD + bootstrap_source])
        if stored is not None:
            return _text(stored)
        return None if revoked else bootstrap_source

    async def add(self, source: str) -> str:
        """Create a write key for `source`, store its hash, and return the key (the only time it is seen)."""
        key = KEY_PREFIX + secrets.token_urlsafe(24)
        await self.redis.hset(KEYS_HASH, hash_write_key(key), source)
        return key

    async def revoke(self, source: str) -> int:
        """Refuse every key of `source` from now on, bootstrap keys included; return how many
        run-time keys were deleted. Keys added later work: revoke then add is how keys rotate."""
        stored = await self.redis.hgetall(KEYS_HASH)
        digests = [d for d, s in stored.items() if _text(s) == source and REVOKED_FIELD not in _text(d)]
        async with self.redis.pipeline(transaction=True) as pipe:
            if digests:
                pipe.hdel(KEYS_HASH, *digests)
            pipe.hset(KEYS_HASH, REVOKED_FIELD + source, 1)
            await pipe.execute()
        return len(digests)

    async def listing(self) -> dict[str, str]:
        """Return source -> "N key(s)" or "revoked" (bootstrap keys refused)."""
        counts: dict[str, int] = {}
        revoked = set()
        for field, value in (await self.redis.hgetall(KEYS_HASH)).items():
            name = _text(field)
            if name.startswith(REVOKED_FIELD):
                revoked.add(name.removeprefix(REVOKED_FIELD))
            else:
                counts[_text(value)] = counts.get(_text(value), 0) + 1
        listing = {source: f"{count} key(s)" for source, count in counts.items()}
        for source in revoked:
            listing[source] = f"{listing[source]}, bootstrap keys revoked" if source in listing else "revoked"
        return listing


async def _run(action: str, source: str | None, redis_url: str) -> int:
    client = aioredis.from_url(redis_url)
    try:
        store = WriteKeyStore(client)
        if action == "list":
            for name, state in sorted((await store.listing()).items()):
                print(f"{name}\t{state}")
            return 0
        assert source is not None
        if action == "add":
            print(await store.add(source))
        else:
            deleted = await store.revoke(source)
            print(f"revoked {source}: {deleted} stored key(s) deleted, bootstrap keys refused")
        return 0
    finally:
        await client.aclose()


def main(argv: list[str]) -> int:
    """`touchstream keys add|revoke SOURCE`, `touchstream keys list`."""
    from touchstream.settings import CoreSettings

    parser = argparse.ArgumentParser(prog="touchstream keys", description="Manage ingest write keys.")
    parser.add_argument("action", choices=["add", "revoke", "list"])
    parser.add_argument("source", nargs="?")
    parser.add_argument("--redis-url", default=None, help="default: TOUCHSTREAM_REDIS_URL")
    args = parser.parse_args(argv)
    if args.action != "list" and not args.source:
        parser.error(f"{args.action} needs a SOURCE")
    return asyncio.run(_run(args.action, args.source, args.redis_url or CoreSettings().redis_url))
