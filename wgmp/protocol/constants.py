"""WireGuard's constants, named as in the whitepaper and wireguard-go's constants.go."""

from __future__ import annotations

from typing import Final

# Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s
CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"

KEY_LEN: Final = 32
MAC_LEN: Final = 16
AEAD_TAG_LEN: Final = 16
TIMESTAMP_LEN: Final = 12
COOKIE_NONCE_LEN: Final = 24

# Message types and sizes.
MESSAGE_INITIATION: Final = 1
MESSAGE_RESPONSE: Final = 2
MESSAGE_COOKIE_REPLY: Final = 3
MESSAGE_TRANSPORT: Final = 4

MESSAGE_INITIATION_SIZE: Final = 148
MESSAGE_RESPONSE_SIZE: Final = 92
MESSAGE_COOKIE_REPLY_SIZE: Final = 64
MESSAGE_TRANSPORT_HEADER_SIZE: Final = 16
MESSAGE_TRANSPORT_MIN_SIZE: Final = MESSAGE_TRANSPORT_HEADER_SIZE + AEAD_TAG_LEN  # a keepalive
MESSAGE_PADDING_MULTIPLE: Final = 16

# Limits by count.
REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1  # wireguard-go's value

# Timers, in seconds.
REKEY_AFTER_TIME: Final = 120.0
REJECT_AFTER_TIME: Final = 180.0
REKEY_ATTEMPT_TIME: Final = 90.0
REKEY_TIMEOUT: Final = 5.0
REKEY_TIMEOUT_JITTER_MAX: Final = 0.334  # jitter is drawn from [0, 1/3 s)
KEEPALIVE_TIMEOUT: Final = 10.0
COOKIE_REFRESH_TIME: Final = 120.0
HANDSHAKE_INITIATION_RATE: Final = 0.020  # at most one initiation from a peer per 20 ms
ZERO_KEY_MATERIAL_AFTER: Final = REJECT_AFTER_TIME * 3

# Replay window: a ring of 128 x 64-bit words with one word kept free.
REPLAY_WINDOW_WORDS: Final = 128
REPLAY_WINDOW_SIZE: Final = (REPLAY_WINDOW_WORDS - 1) * 64  # 8128

# Handshake rate limiting under load.
RATELIMIT_PACKETS_PER_SECOND: Final = 20
RATELIMIT_PACKETS_BURSTABLE: Final = 5
RATELIMIT_GC_INTERVAL: Final = 1.0
RATELIMIT_MAX_ENTRIES: Final = 8192
UNDER_LOAD_AFTER_TIME: Final = 1.0  # "under load" stays set for 1 s after the backlog drains
MAX_QUEUED_INCOMING_HANDSHAKES: Final = 4096
UNDER_LOAD_QUEUE_FRACTION: Final = 8  # under load when the backlog is >= capacity / 8

# Devices.
DEFAULT_MTU: Final = 1420
MAX_PEERS: Final = 1 << 16  # wireguard-go's MaxPeers: one more is refused with EINVAL
# A peer holds at most three keypairs (previous, current, next); control keeps a key slot of
# each until every worker acknowledged dropping it.
MAX_KEYPAIRS_PER_PEER: Final = 3
MAX_STAGED_PACKETS: Final = 128  # packets staged per peer while waiting for a handshake
MESSAGE_OVERHEAD_IPV4: Final = 20 + 8 + MESSAGE_TRANSPORT_MIN_SIZE
MESSAGE_OVERHEAD_IPV6: Final = 40 + 8 + MESSAGE_TRANSPORT_MIN_SIZE

# Timer state machine (protocol/timers.py).
# Retries allowed before giving up, as wireguard-go's MaxTimerHandshakes (90 / 5 = 18); with the
# first initiation and the "> MAX" test this sends 20 initiations (about 100 s) before giving up.
MAX_TIMER_HANDSHAKES: Final = int(REKEY_ATTEMPT_TIME // REKEY_TIMEOUT)
# Receive path: the initiator rekeys when its current key is older than this (165 s), so that a
# fresh key exists before REJECT_AFTER_TIME; wireguard-go's former RekeyAfterTimeReceiving.
REKEY_AFTER_TIME_RECEIVING: Final = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
