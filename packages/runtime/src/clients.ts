// The clients a service keeps open to its peers, one per (client class, address).
// Keyed by the constructor itself, not its name: every class that @grpc/grpc-js's
// makeGenericClientConstructor generates is called `ServiceClientImpl`, so a name key
// handed the client of one API back for another API at the same address (issue 16).
import { credentials, type ChannelCredentials, type Client, type ClientOptions } from "@grpc/grpc-js";

export type ClientCtor<C> = new (address: string, creds: ChannelCredentials, options?: Partial<ClientOptions>) => C;

export class ClientCache {
  private readonly byCtor = new Map<ClientCtor<Client>, Map<string, Client>>();

  constructor(private readonly creds: () => ChannelCredentials = () => credentials.createInsecure()) {}

  /** The client of class `ctor` for `address`, created on first use. */
  get<C extends Client>(address: string, ctor: ClientCtor<C>): C {
    const key = ctor as unknown as ClientCtor<Client>;
    let perAddress = this.byCtor.get(key);
    if (!perAddress) this.byCtor.set(key, (perAddress = new Map()));
    let c = perAddress.get(address);
    if (!c) perAddress.set(address, (c = new ctor(address, this.creds())));
    return c as C;
  }

  /** How many clients are open (for tests and diagnostics). */
  get size(): number {
    let n = 0;
    for (const m of this.byCtor.values()) n += m.size;
    return n;
  }

  /** Closes every client; the cache is empty afterwards. */
  closeAll(): void {
    for (const m of this.byCtor.values()) for (const c of m.values()) c.close();
    this.byCtor.clear();
  }
}
