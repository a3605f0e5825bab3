// @virtmesh/vfio: the VFIO type1 IOMMU container of one VM (seed 004), a pure
// library the shm-sidecar's DmaMap/DmaUnmap/PinPages/UnpinPages/DirtyPages/
// IommuInfo handlers call.
export {
  IommuContainer,
  dirtyBitmapBytes,
  testBit,
  VFIO_DMA_MAP_FLAG_READ,
  VFIO_DMA_MAP_FLAG_WRITE,
  VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
  VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
  VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
  VFIO_DIRTY_BITMAP_HDR_SZ,
  VFIO_DIRTY_BITMAP_GET_SZ,
  VFIO_PIN_PAGES_MAX_ENTRIES,
  DEFAULT_IOVA_PGSIZES,
  DEFAULT_IOVA_BITS,
  DEFAULT_DMA_ENTRY_LIMIT,
  DEFAULT_MAX_BITMAP_BYTES,
} from "./container";
export type {
  IommuContainerOptions,
  DmaMapRequest,
  DmaUnmapRequest,
  DmaMapping,
  DmaUnmapOk,
  DirtyRange,
  DirtyReport,
  DirtyPagesOp,
  DirtyPagesRequest,
  DirtyPagesResult,
  GetBitmapRequest,
  IommuInfo,
} from "./container";
export { GRPC_STATUS, grpcStatusCode, U64_MAX } from "./result";
export type { IommuError, IommuErrorCode, IommuResult, U64, VfioErrno } from "./result";
