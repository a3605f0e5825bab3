// migration-manager: the cluster's migration controller; see README.md.
import { runService } from "@virtmesh/runtime";

void runService({
  name: "migration-manager",
  hostScoped: false,
  setup() {},
});
