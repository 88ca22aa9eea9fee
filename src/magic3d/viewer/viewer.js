// magic3d mesh viewer: draws every <canvas class="mesh" data-mesh="ID"> of the page with the
// GLB stored in window.magic3dMeshes[ID] (base64, from meshes/ID.js), orbit controls on each.
//
// Classic script (no ES modules: a file:// page cannot load them). One WebGL renderer serves
// every canvas: it renders a view off screen and copies the picture into that canvas's 2D
// context, so a page with many stages (an ablation) needs one WebGL context, not one per stage
// (browsers cap them at about 16 and drop the oldest). A view is redrawn when its controls move
// or the window resizes; nothing animates in between.
//
// State for people and tests: each canvas gets data-state "loading" -> "drawn" or "failed"
// (with data-error), and data-box (its page rectangle, CSS pixels) once drawn; each video gets
// data-state "loaded" or "failed"; when every mesh is settled <html> gets data-viewer="ready"
// and data-drawn / data-failed counts, and the title ends in "(ready)".
(function () {
  "use strict";

  var T = window.Magic3DThree;
  var BACKGROUND = 0xf2f2f5; // the page's --canvas-bg (index.html's style)
  var FOV_DEG = 40;
  var VIEW_AZIMUTH_DEG = 30; // the mesh's front is +x (magic3d's azimuth 0); a three-quarter view
  var VIEW_ELEVATION_DEG = 15; // the evaluator's camera elevation

  function setState(element, state, error) {
    element.dataset.state = state;
    if (error) {
      element.dataset.error = error;
      var note = element.parentElement.querySelector(".mesh-error");
      if (note) note.textContent = error;
    }
  }

  function base64ToBuffer(text) {
    var bytes = atob(text);
    var out = new Uint8Array(bytes.length);
    for (var i = 0; i < bytes.length; i++) out[i] = bytes.charCodeAt(i);
    return out.buffer;
  }

  var renderer = null;
  function sharedRenderer() {
    if (renderer === null) {
      renderer = new T.WebGLRenderer({ antialias: true, alpha: false, preserveDrawingBuffer: true });
      renderer.outputColorSpace = T.SRGBColorSpace;
      renderer.setClearColor(new T.Color(BACKGROUND), 1);
    }
    return renderer;
  }

  function draw(view) {
    var canvas = view.canvas;
    var width = Math.max(1, canvas.clientWidth);
    var height = Math.max(1, canvas.clientHeight);
    var ratio = window.devicePixelRatio || 1;
    var r = sharedRenderer();
    r.setPixelRatio(ratio);
    r.setSize(width, height, false);
    canvas.width = r.domElement.width;
    canvas.height = r.domElement.height;
    view.camera.aspect = width / height;
    view.camera.updateProjectionMatrix();
    r.render(view.scene, view.camera);
    view.context.drawImage(r.domElement, 0, 0); // same task as render: the buffer is intact
    var box = canvas.getBoundingClientRect();
    canvas.dataset.box = [box.left + window.scrollX, box.top + window.scrollY, box.width, box.height]
      .map(function (v) { return Math.round(v); }).join(",");
  }

  function frame(camera, controls, object) {
    var box = new T.Box3().setFromObject(object);
    var centre = box.getCenter(new T.Vector3());
    var radius = Math.max(1e-6, box.getSize(new T.Vector3()).length() / 2);
    // The bounding sphere fits the vertical field of view, with a 15% margin.
    var distance = (1.15 * radius) / Math.sin((FOV_DEG * Math.PI) / 360);
    var az = (VIEW_AZIMUTH_DEG * Math.PI) / 180;
    var el = (VIEW_ELEVATION_DEG * Math.PI) / 180;
    // glTF is +y up; magic3d's azimuth 0 (+x) is glTF's +x and its +y is glTF's -z.
    camera.position.set(
      centre.x + distance * Math.cos(el) * Math.cos(az),
      centre.y + distance * Math.sin(el),
      centre.z - distance * Math.cos(el) * Math.sin(az)
    );
    camera.near = distance / 100;
    camera.far = distance * 100;
    controls.target.copy(centre);
    controls.update();
  }

  function load(canvas) {
    return new Promise(function (resolve) {
      var id = canvas.dataset.mesh;
      var data = (window.magic3dMeshes || {})[id];
      if (!data) {
        setState(canvas, "failed", "mesh data " + id + " is missing (meshes/" + id + ".js)");
        resolve(false);
        return;
      }
      setState(canvas, "loading");
      var scene = new T.Scene();
      scene.background = new T.Color(BACKGROUND);
      scene.add(new T.HemisphereLight(0xffffff, 0x667080, 2.0));
      var camera = new T.PerspectiveCamera(FOV_DEG, 1, 0.01, 100);
      var headlight = new T.DirectionalLight(0xffffff, 1.5);
      camera.add(headlight); // lit from the viewer's side whichever way it orbits
      scene.add(camera);
      var view = { canvas: canvas, context: canvas.getContext("2d"), scene: scene, camera: camera };
      new T.GLTFLoader().parse(
        base64ToBuffer(data), "",
        function (gltf) {
          try {
            scene.add(gltf.scene);
            var controls = new T.OrbitControls(camera, canvas);
            frame(camera, controls, gltf.scene);
            controls.addEventListener("change", function () { draw(view); });
            view.controls = controls;
            views.push(view);
            draw(view);
            setState(canvas, "drawn");
            resolve(true);
          } catch (err) {
            setState(canvas, "failed", "drawing failed: " + err);
            resolve(false);
          }
        },
        function (err) {
          setState(canvas, "failed", "the GLB did not load: " + (err && err.message ? err.message : err));
          resolve(false);
        }
      );
    });
  }

  function watchVideo(video) {
    video.addEventListener("loadeddata", function () { video.dataset.state = "loaded"; });
    video.addEventListener("error", function () { video.dataset.state = "failed"; });
    if (video.readyState >= 2) video.dataset.state = "loaded";
  }

  var views = [];
  function start() {
    Array.prototype.forEach.call(document.querySelectorAll("video"), watchVideo);
    var canvases = Array.prototype.slice.call(document.querySelectorAll("canvas.mesh"));
    var settled;
    if (!T) {
      canvases.forEach(function (c) { setState(c, "failed", "three-bundle.min.js did not load"); });
      settled = Promise.resolve(canvases.map(function () { return false; }));
    } else {
      // One after another: a long page then shows meshes as they come, and parsing stays light.
      settled = canvases.reduce(function (chain, canvas) {
        return chain.then(function (done) {
          return load(canvas).then(function (ok) { return done.concat([ok]); });
        });
      }, Promise.resolve([]));
    }
    settled.then(function (results) {
      var drawn = results.filter(Boolean).length;
      var root = document.documentElement;
      root.dataset.drawn = String(drawn);
      root.dataset.failed = String(results.length - drawn);
      root.dataset.viewer = "ready";
      document.title = document.title + " (ready)";
    });
    window.addEventListener("resize", function () { views.forEach(draw); });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
