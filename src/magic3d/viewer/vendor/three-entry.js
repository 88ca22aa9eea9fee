// Entry point of three-bundle.min.js (built by scripts/vendor_three.sh): the parts of three.js
// that viewer.js uses, as one classic script defining `window.Magic3DThree`. A classic script,
// not ES modules: browsers refuse module scripts from file:// pages (CORS, origin "null"),
// and the viewer page must open from disk with no server.
export {
  Box3,
  Color,
  DirectionalLight,
  HemisphereLight,
  PerspectiveCamera,
  REVISION,
  SRGBColorSpace,
  Scene,
  Vector3,
  WebGLRenderer,
} from 'three';
export { GLTFLoader } from 'three/addons/loaders/GLTFLoader.js';
export { OrbitControls } from 'three/addons/controls/OrbitControls.js';
