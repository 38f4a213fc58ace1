/**
 * Challenge-response authentication for the embedded KVS, in both directions.
 *
 * The server opens each connection with a random nonce. To gain a scope (one
 * namespace, or 'admin') the client sends its own nonce and
 * HMAC-SHA256(secret, "dyad-kvs/2 client" | scope | server nonce | client nonce);
 * the server answers with the same MAC labelled "server", proving it holds the
 * secret too, so a process squatting on the port cannot feed clients invented
 * metadata. The secret never crosses the wire, the per-connection nonces stop
 * replay, and binding the scope stops a proof for one namespace being used for
 * another.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { PROTOCOL } from './protocol.js';

export const NONCE_HEX_CHARS = 64;

export function newNonce(): string {
  return randomBytes(NONCE_HEX_CHARS / 2).toString('hex');
}

export function isNonce(v: unknown): v is string {
  return typeof v === 'string' && v.length === NONCE_HEX_CHARS && /^[0-9a-f]+$/.test(v);
}

/** 'admin' or 'ns:<name>'. */
export function scopeOf(ns: string | undefined): string {
  return ns === undefined ? 'admin' : `ns:${ns}`;
}

export function authProof(secret: string, side: 'client' | 'server', scope: string, serverNonce: string, clientNonce: string): string {
  return createHmac('sha256', Buffer.from(secret, 'hex'))
    .update(`${PROTOCOL} ${side}\n${scope}\n${serverNonce}\n${clientNonce}`)
    .digest('hex');
}

/** Constant-time comparison of a proof against an untrusted value. */
export function proofMatches(expected: string, given: unknown): boolean {
  if (typeof given !== 'string' || given.length !== expected.length) return false;
  return timingSafeEqual(Buffer.from(expected, 'utf8'), Buffer.from(given, 'utf8'));
}
