#include <napi.h>
// Placeholder so the addon builds during the first install; the real addon replaces this file.
static Napi::Object Init(Napi::Env env, Napi::Object exports) { return exports; }
NODE_API_MODULE(virtmesh_shm, Init)
