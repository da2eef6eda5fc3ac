// Type declarations for roomcast.js, the browser client of the roomcast.v1
// protocol (PROTOCOL.md).

/** The WebSocket subprotocol the client speaks: "roomcast.v1". */
export declare const PROTOCOL: "roomcast.v1";

/** Close codes (PROTOCOL.md section 4); the names of Go's package protocol. */
export declare const CLOSE: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  UNSUPPORTED_DATA: 1003;
  ABNORMAL: 1006;
  INVALID_PAYLOAD: 1007;
  POLICY_VIOLATION: 1008;
  MESSAGE_TOO_BIG: 1009;
  INTERNAL_ERROR: 1011;
  TRY_AGAIN_LATER: 1013;
  HEARTBEAT_TIMEOUT: 4001;
  SLOW_CONSUMER: 4002;
  DISCONNECTED: 4003;
  RATE_LIMITED: 4004;
  IDLE_TIMEOUT: 4005;
  ROOM_RESET: 4006;
}>;

/** Error codes of the server's "error" envelopes (PROTOCOL.md 3.5). */
export declare const ERROR: Readonly<{
  BAD_REQUEST: "bad_request";
  UNKNOWN_TYPE: "unknown_type";
  INVALID_ROOM: "invalid_room";
  FORBIDDEN: "forbidden";
  TOO_MANY_ROOMS: "too_many_rooms";
  RATE_LIMITED: "rate_limited";
  NOT_SUBSCRIBED: "not_subscribed";
  NOT_SUPPORTED: "not_supported";
  REJECTED: "rejected";
  UNAVAILABLE: "unavailable";
  INTERNAL: "internal";
}>;

/** Why a recovery was refused (PROTOCOL.md 3.7). */
export declare const REASON: Readonly<{
  EPOCH_CHANGED: "epoch_changed";
  HISTORY_TOO_SHORT: "history_too_short";
  TOO_MANY_MISSED: "too_many_missed";
  UNKNOWN_POSITION: "unknown_position";
}>;

/**
 * The connection's state. "listening": the WebSocket cannot connect, and
 * the client listens to its rooms over an event stream (Server-Sent
 * Events) instead; requests fail with "listening_only" until the
 * WebSocket, tried again every maxDelay, is back. A server that is down
 * (restarting) never causes it: the client listens only when the server
 * answers HTTP and the WebSocket still fails.
 */
export type State = "connecting" | "open" | "reconnecting" | "listening" | "closed";

/** A place in a room's sequence: a message's epoch and seq. */
export interface Position {
  epoch: string;
  seq: number;
}

/** Timer functions, replaceable for tests. */
export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  /** A monotonic clock in milliseconds (default `performance.now()`), to measure silence. */
  now(): number;
}

/** A WebSocket constructor compatible with the browser's. */
export interface WebSocketConstructor {
  new (url: string, protocols?: string | string[]): WebSocketLike;
}

/** The part of the browser WebSocket the client uses. */
export interface WebSocketLike {
  readonly readyState: number;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** What `onStateChange` receives with "open": the server's welcome. */
export interface OpenDetail {
  connId: string;
  /** Null for an anonymous connection. */
  userId: string | null;
  heartbeatMs: number;
  timeoutMs: number;
  maxMessageBytes: number;
  maxRooms: number;
}

/** What `onStateChange` receives with "reconnecting": why, and when the next attempt is. */
export interface ReconnectingDetail {
  /** The close code; 1006 when the connection failed, was lost or timed out connecting, 4001 when the client found it silent. */
  code: number;
  reason: string;
  /** Milliseconds until the next attempt. */
  delay: number;
  /** The number of that attempt since the last welcome, from 1. */
  attempt: number;
}

/** What `onStateChange` receives with "listening": why the WebSocket was given up for now. */
export interface ListeningDetail {
  code: number;
  reason: string;
  transport: "sse";
}

/** An EventSource constructor compatible with the browser's. */
export interface EventSourceConstructor {
  new (url: string, init?: { withCredentials?: boolean }): {
    readonly readyState: number;
    onerror: ((ev: unknown) => void) | null;
    addEventListener(type: string, listener: (ev: { data: string; lastEventId: string }) => void): void;
    close(): void;
  };
}

/** What `onStateChange` receives with "closed". */
export interface ClosedDetail {
  /** 1000 after `client.close()`; otherwise the server's close code (e.g. 4003). */
  code: number;
  reason: string;
}

export interface ConnectOptions {
  /** The WebSocket constructor; default `globalThis.WebSocket`. Required in Node 20 without --experimental-websocket. */
  WebSocket?: WebSocketConstructor;
  /** Reconnect after a drop; default true. Never after close codes 4003, 4005, 1003, 1007 or 1008. */
  reconnect?: boolean;
  /** The first reconnect delay in ms; default 500. Doubles per failed attempt. */
  minDelay?: number;
  /** The largest reconnect delay in ms; default 30000. */
  maxDelay?: number;
  /** 0..1, default 0.5: each delay is `delay * (1 - jitter * Math.random())`. */
  jitter?: number;
  /** ms to wait for the server's welcome after dialing, default 10000; then the attempt counts as failed (code 1006). */
  connectTimeout?: number;
  /** The most publishes waiting in the outbox for the server's answer; one more rejects with "outbox_full". Default 1000. */
  outbox?: number;
  /** "sse" (default): listen over an event stream when the WebSocket cannot connect; "none": keep trying the WebSocket only. */
  fallback?: "sse" | "none";
  /** How many WebSocket attempts in a row with no welcome before asking whether the server answers HTTP, and listening over an event stream if it does; default 2. */
  fallbackAfter?: number;
  /** The EventSource constructor; default `globalThis.EventSource`. Without one there is no fallback. */
  EventSource?: EventSourceConstructor;
  /** Replacement timers, for tests. */
  timers?: Partial<Timers>;
  /**
   * Called on every change of `client.state`, and again with "reconnecting"
   * for each failed attempt. Not called for the initial "connecting".
   */
  onStateChange?: {
    (state: "open", detail: OpenDetail): void;
    (state: "reconnecting", detail: ReconnectingDetail): void;
    (state: "listening", detail: ListeningDetail): void;
    (state: "closed", detail: ClosedDetail): void;
    (state: State, detail: OpenDetail | ReconnectingDetail | ListeningDetail | ClosedDetail): void;
  };
}

/** How a payload travelled: JSON in "data", a string in "text", bytes in "binary". */
export type PayloadKind = "json" | "text" | "binary";

/** A message of a subscribed room. */
export interface Message<T = unknown> {
  room: string;
  epoch: string;
  seq: number;
  /** The message_id: unique across rooms and servers. Null when listening over an event stream, which carries positions only. */
  id: string | null;
  /** When the server sequenced it; null when listening over an event stream. */
  time: Date | null;
  /** The parsed JSON value (kind "json"), the string ("text") or the bytes ("binary"). */
  data: T;
  raw: { kind: PayloadKind };
}

/** A message the server addressed to this connection or its user. */
export interface DirectMessage<T = unknown> {
  data: T;
  raw: { kind: PayloadKind };
}

/** A member that joined or left a room. */
export interface Member {
  /** The connection that joined (a member's first) or left (its last). */
  connId: string | null;
  /** Null for an anonymous member. */
  userId: string | null;
  info: Record<string, unknown> | null;
}

/** The answer to `sub.presence()`. */
export interface Presence {
  /** Members: a user counts once however many connections it has. */
  count: number;
  connections: number;
  /** Empty in a room whose presence mode is "counts". */
  members: Array<{
    conns: string[];
    userId: string | null;
    info: Record<string, unknown> | null;
  }>;
}

/** What `onSubscribe` receives: the server's subscribe ack. */
export interface SubscribeInfo {
  epoch: string;
  /** The room's newest seq when the subscription started. */
  seq: number;
  /** How the room tracks members. */
  presence: "on" | "counts" | "off";
  /** How many messages are replayed right after (from `history` or recovery). */
  missed: number;
  /** True when this renewed the subscription after a reconnect (with `since`). */
  resumed: boolean;
}

/** What `onRecover` receives after a reconnect. */
export type Recovery =
  | { recovered: true; missed: number }
  | {
      recovered: false;
      missed: 0;
      /** Why: "epoch_changed", "history_too_short", "too_many_missed", "unknown_position", or another the server adds. */
      reason: string;
    };

export interface SubscribeOptions<T = unknown> {
  /** Each message, in seq order; duplicates (seq <= the last seen in the same epoch) are dropped. */
  onMessage?: (msg: Message<T>) => void;
  /** A member joined (needs `presence: true`). */
  onJoin?: (member: Member) => void;
  /** A member left (needs `presence: true`). */
  onLeave?: (member: Member) => void;
  /** Receive join and leave events. */
  presence?: boolean;
  /** What other members see of this connection; a JSON object. */
  info?: Record<string, unknown>;
  /** Replay the room's last N kept messages on the first subscribe. */
  history?: number;
  /** Each successful subscribe, the first and every renewal. Load the room's state from here to miss nothing. */
  onSubscribe?: (info: SubscribeInfo) => void;
  /**
   * After each renewal with `since`: whether exactly the missed messages
   * follow. When `recovered` is false, reload the room's state.
   */
  onRecover?: (recovery: Recovery) => void;
  /**
   * The server refused the subscribe. For "rate_limited", "unavailable"
   * and "internal" it is retried with backoff; for any other code the
   * subscription ends (`sub.active` becomes false).
   */
  onError?: (err: RoomcastError) => void;
}

export interface PayloadOptions {
  /** Send this string as the payload ("text"); pass `undefined` as the value. */
  text?: string;
  /** Send these bytes as the payload ("binary"); pass `undefined` as the value. */
  binary?: Uint8Array;
}

export interface SendOptions extends PayloadOptions {
  /** A room passed on to the server's message handler. */
  room?: string;
}

/** Where a publish landed in its room: the resolved value of `publish`. */
export interface Published {
  room: string;
  /** The room's epoch and the message's seq; null when the server dropped it (no history, no subscriber) or predates positions in acks. */
  epoch: string | null;
  seq: number | null;
  messageId: string | null;
  /** An earlier attempt of this publish had been published already (its ack was lost with a connection): this is its position. */
  duplicate: boolean;
}

/**
 * A request's failure. `code` is a server error code (PROTOCOL.md 3.5) or
 * the client's own "disconnected", "too_large", "outbox_full" or "expired".
 */
export declare class RoomcastError extends Error {
  constructor(code: string, message: string, closeCode?: number);
  readonly name: "RoomcastError";
  code:
    | "disconnected"
    | "too_large"
    | "outbox_full"
    | "expired"
    | "listening_only"
    | "bad_request"
    | "unknown_type"
    | "invalid_room"
    | "forbidden"
    | "too_many_rooms"
    | "rate_limited"
    | "not_subscribed"
    | "not_supported"
    | "rejected"
    | "unavailable"
    | "internal"
    | (string & {});
  /** With "disconnected" after a drop: the close code. */
  closeCode?: number;
}

/** A subscription to one room; it survives reconnects. */
export declare class Subscription {
  private constructor();
  readonly room: string;
  /** The last message seen, or the ack's start position before any; null until the first ack. */
  readonly position: Position | null;
  /** False after `unsubscribe()` or a subscribe the server refused for good. */
  readonly active: boolean;
  /** Leave the room; no callback runs after the call. */
  unsubscribe(): Promise<void>;
  /** Who is in the room. */
  presence(): Promise<Presence>;
}

/** A connection to a roomcast server that reconnects by itself. */
export declare class Client {
  private constructor();
  readonly state: State;
  /** The current connection's id; null when not open. */
  readonly connId: string | null;
  /** The authenticated user, from the welcome; null when anonymous. */
  readonly userId: string | null;
  /** Subscribe to a room; throws if already subscribed to it. */
  subscribe<T = unknown>(room: string, options?: SubscribeOptions<T>): Subscription;
  /** Publish a JSON value, or `{text}` / `{binary}` with `undefined` as value. Rejects with "disconnected" when not open. */
  /** Publish exactly once: the publish waits in the outbox, is sent again with its key after a dropped connection, and resolves once with where it landed. */
  publish(room: string, value: unknown, options?: PayloadOptions): Promise<Published>;
  /** Send to the server's message handler; same rules as publish. */
  send(value: unknown, options?: SendOptions): Promise<void>;
  /** Receive direct messages; returns a function that stops it. */
  onDirect<T = unknown>(callback: (msg: DirectMessage<T>) => void): () => void;
  /** Close for good with 1000. */
  close(): void;
}

/** Connect to a roomcast server (protocol mode). A relative URL resolves against the page. */
export declare function connect(url: string | URL, options?: ConnectOptions): Client;
