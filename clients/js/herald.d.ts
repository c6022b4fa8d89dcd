// Type declarations for herald.js, the Herald browser client.

/** A WebSocket constructor: the browser's, Node 22's global, or `ws`'s. */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason: string; wasClean?: boolean }) => void) | null;
  onerror: ((ev: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ConnectOptions {
  /**
   * The node's WebSocket endpoint, e.g. "wss://push.example.com/ws".
   * http(s) URLs are turned into ws(s); relative URLs resolve against the
   * page. Default in a browser: "/ws" on the page's host.
   */
  url?: string;
  /** A fixed token (HS256 JWT whose `sub` is the user id). */
  token?: string;
  /**
   * Called before every connection attempt, the first one and every
   * reconnect, so an expired token can be refreshed. Takes precedence over
   * `token`.
   */
  getToken?: () => string | Promise<string>;
  /**
   * Resume position for the first connect: the newest stored message id the
   * app already has (e.g. persisted from `client.lastId`). The server then
   * sends every stored message after it, read or not. "0-0" asks for every
   * stored message. Without it the first connect gets the newest unread
   * messages (up to the server's replay limit).
   */
  since?: string;
  /** WebSocket implementation; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** Interval of application-level pings, ms. Default 20000. */
  pingInterval?: number;
  /** A link that answers a ping with nothing for this long is dropped, ms. Default 10000. */
  pongTimeout?: number;
  /** An attempt with no welcome frame after this long is abandoned, ms. Default 10000. */
  connectTimeout?: number;
  /** First reconnect delay, ms. Default 1000. */
  backoffInitial?: number;
  /** Largest reconnect delay, ms. Default 30000. */
  backoffMax?: number;
  /** Growth of the delay per failed attempt. Default 2. */
  backoffFactor?: number;
  /** Share of each delay taken off at random (0..1). Default 0.5. */
  jitter?: number;
  /** Smallest delay after close code 4029 (too many connections), ms. Default 60000. */
  tooManyConnectionsDelay?: number;
  /** The server's --replay-limit, used to tell replayed from live messages. Default 100. */
  replayLimit?: number;
  /**
   * Where the token goes: 'protocol' (default) sends `Sec-WebSocket-Protocol:
   * herald.v1, herald.token.<JWT>`, keeping it out of URLs and logs; 'query'
   * sends `?token=<JWT>` (for proxies that drop the header).
   */
  tokenIn?: 'protocol' | 'query';
}

export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface HeraldMessage {
  /** "<ms>-<seq>" for stored messages, "t..." for live-only ones. */
  id: string;
  topic: string;
  /** The payload exactly as the backend sent it, parsed. */
  data: unknown;
  /** Send time, unix ms. */
  ts: number;
  /** Live-only (transient send or broadcast): not stored, not counted as unread. */
  transient: boolean;
  /** Sent as part of the replay at connect time rather than live. */
  replayed: boolean;
}

export interface OpenDetail {
  user: string;
  /** The server's id for this connection. */
  conn: string;
  /** The user's unread count at connect time. */
  unread: number;
  /**
   * With a resume position: true when every message after it was still
   * stored; false when some may have been dropped meanwhile (retention), so
   * the app may want to reload what it shows. null when no position was sent.
   */
  resumed: boolean | null;
  /** The resume position sent, if any. */
  since: string | null;
  /** False for the first successful connect of this client. */
  reconnect: boolean;
}

export interface UnreadDetail {
  count: number;
  /** welcome: the count at connect; server: an "unread" frame; local: +1 for a new live message. */
  source: 'welcome' | 'server' | 'local';
}

export interface CloseDetail {
  code: number;
  reason: string;
  wasClean: boolean;
  /** False after close() and after code 4001; the client is then done. */
  willReconnect: boolean;
  /** ms until the next attempt, when one is planned. */
  delay: number | null;
  /** The client ended the socket (close(), reconnect(), ping or connect timeout). */
  byClient: boolean;
}

export interface ErrorDetail {
  /** For error frames from the server: e.g. "bad_request", "unavailable". */
  code?: string;
  message: string;
  error: unknown;
}

export interface StateDetail {
  state: ConnectionState;
}

/** A stored message as a history page lists it. */
export interface StoredMessage {
  id: string;
  topic: string;
  data: unknown;
  ts: number;
  read: boolean;
}

export interface HistoryOptions {
  /** Exclusive start: the previous page's `next`. */
  cursor?: string | null;
  /** 1 to 50; default 20. */
  limit?: number;
  oldestFirst?: boolean;
  unreadOnly?: boolean;
  /** Only topics starting with this. */
  topic?: string;
  /** ms; default 10000. */
  timeout?: number;
}

export interface HistoryPage {
  messages: StoredMessage[];
  /** Cursor of the next page; null at the end. */
  next: string | null;
  /** The user's whole unread count. */
  unread: number | null;
}

/** A message-center change made on any device of the user. */
export interface ChangedDetail {
  op: 'read' | 'unread' | 'delete';
  /** The messages that changed (empty for up_to reads and delete-all). */
  ids: string[];
  /** Read up to (and including) this id. */
  upTo: string | null;
  /** Everything was deleted. */
  all: boolean;
  /** The unread count after the change. */
  count: number | null;
}

export interface HeraldEventMap {
  changed: ChangedDetail;
  open: OpenDetail;
  message: HeraldMessage;
  unread: UnreadDetail;
  close: CloseDetail;
  error: ErrorDetail;
  state: StateDetail;
}

export declare const CloseCodes: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  ABNORMAL: 1006;
  TOO_BIG: 1009;
  TRY_AGAIN_LATER: 1013;
  DISCONNECTED: 4001;
  TOO_MANY_CONNECTIONS: 4029;
  /** The token expired: the client calls getToken() and reconnects at once with `since`. */
  TOKEN_EXPIRED: 4401;
}>;

/** The protocol offered and echoed: 'herald.v1'. */
export declare const SUBPROTOCOL: 'herald.v1';
/** Prefix of the protocol entry carrying the token: 'herald.token.'. */
export declare const TOKEN_PROTOCOL_PREFIX: 'herald.token.';

export declare class HeraldClient extends EventTarget {
  constructor(options: ConnectOptions);
  /** The newest stored message id seen: the resume position. */
  readonly lastId: string | null;
  /** The unread count once known. */
  readonly unread: number | null;
  readonly state: ConnectionState;
  readonly user: string | null;
  readonly connId: string | null;
  /** The current attempt's WebSocket (diagnostics). */
  readonly socket: WebSocketLike | null;

  /** Listens with the event's payload; returns a function that stops listening. */
  on<K extends keyof HeraldEventMap>(type: K, fn: (detail: HeraldEventMap[K], event: CustomEvent<HeraldEventMap[K]>) => void): () => void;
  off<K extends keyof HeraldEventMap>(type: K, fn: (detail: HeraldEventMap[K], event: CustomEvent<HeraldEventMap[K]>) => void): void;
  addEventListener<K extends keyof HeraldEventMap>(
    type: K,
    listener: (event: CustomEvent<HeraldEventMap[K]>) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof HeraldEventMap>(
    type: K,
    listener: (event: CustomEvent<HeraldEventMap[K]>) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;

  /**
   * Marks `id` and every older message read on all of the user's devices
   * (default: the newest message seen). Sent on the next connect if offline.
   */
  markRead(id?: string): void;
  /** A page of stored messages with read flags (the message center). */
  history(options?: HistoryOptions): Promise<HistoryPage>;
  /** Marks just these messages read on every device; false when not connected. */
  markReadIds(ids: string[]): boolean;
  /** Marks these messages unread again on every device; false when not connected. */
  markUnread(ids: string[]): boolean;
  /** Marks everything read on every device; false when not connected. */
  markAllRead(): boolean;
  /** Deletes these messages for every device; false when not connected. */
  deleteMessages(ids: string[]): boolean;
  /** Deletes every stored message of the user; false when not connected. */
  deleteAll(): boolean;
  /** Drops the current socket and connects again at once (resets the backoff). */
  reconnect(): void;
  /** Closes for good; resolves when the socket is closed. */
  close(code?: number, reason?: string): Promise<void>;
}

/** Creates a client and starts connecting. */
export declare function connect(options: ConnectOptions): HeraldClient;
/** Orders stored-message ids numerically by (ms, seq). */
export declare function compareIds(a: string, b: string): number;
/** Whether `id` is a stored-message id ("<ms>-<seq>"). */
export declare function isStoredId(id: string): boolean;
