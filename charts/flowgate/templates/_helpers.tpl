{{/* The namespace of every object. */}}
{{- define "flowgate.namespace" -}}
{{- default .Release.Namespace .Values.namespace.name -}}
{{- end -}}

{{/* Labels of an object: pass (dict "ctx" $ "component" "api"). */}}
{{- define "flowgate.labels" -}}
app.kubernetes.io/name: flowgate
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: flowgate
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 }}
{{- end -}}

{{/* Selector labels (as k8s/base: name and component only). */}}
{{- define "flowgate.selector" -}}
app.kubernetes.io/name: flowgate
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference from {repository, tag, digest}. */}}
{{- define "flowgate.image" -}}
{{- if .digest -}}
{{ .repository }}@{{ .digest }}
{{- else -}}
{{ .repository }}:{{ .tag }}
{{- end -}}
{{- end -}}

{{/* "true" when the API pods run the activator of sleeping instances (with the
operator backend the operator's pods do, operator.activator; flowgate refuses
--activator-listen with it). */}}
{{- define "flowgate.activator" -}}
{{- if and .Values.api.activator.enabled (ne .Values.api.backend "operator") -}}
true
{{- end -}}
{{- end -}}

{{/* The restricted securityContext of a pod. */}}
{{- define "flowgate.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* The restricted securityContext of a container. */}}
{{- define "flowgate.containerSecurityContext" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* image and pull policy of a flowgate container */}}
{{- define "flowgate.provisionerImage" -}}
image: {{ include "flowgate.image" .Values.images.provisioner | quote }}
{{- with .Values.images.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end -}}

{{/* FLOWGATE_NAMESPACE and the settings ConfigMap: the environment of every flowgate container. */}}
{{- define "flowgate.env" -}}
env:
  - name: FLOWGATE_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
envFrom:
  - configMapRef:
      name: flowgate-config
{{- end -}}

{{/* Pod-level scheduling and pull secrets (API and operator). */}}
{{- define "flowgate.podExtras" -}}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.api.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.api.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.api.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The settings ConfigMap's data (also hashed into the pods' checksum annotation). */}}
{{- define "flowgate.config" -}}
FLOWGATE_HOST: {{ required "host is required" .Values.host | quote }}
FLOWGATE_URL_SCHEME: {{ .Values.urlScheme | quote }}
FLOWGATE_ROUTE_KIND: {{ .Values.instances.routeKind | quote }}
{{- with .Values.instances.gateway }}
FLOWGATE_GATEWAY: {{ . | quote }}
{{- end }}
{{- with .Values.ingress.className }}
FLOWGATE_INGRESS_CLASS: {{ . | quote }}
{{- end }}
{{- /* HTTPRoutes take TLS from their Gateway: flowgate refuses a Secret for them */}}
{{- if ne .Values.instances.routeKind "gateway" }}
{{- with .Values.ingress.tlsSecret }}
FLOWGATE_TLS_SECRET: {{ . | quote }}
{{- end }}
{{- end }}
FLOWGATE_MLFLOW_IMAGE: {{ include "flowgate.image" .Values.images.mlflow | quote }}
FLOWGATE_ADAPTER_IMAGE: {{ include "flowgate.image" .Values.images.adapter | quote }}
FLOWGATE_DEFAULT_TTL: {{ .Values.ttl.default | quote }}
{{- with .Values.ttl.max }}
FLOWGATE_MAX_TTL: {{ . | quote }}
{{- end }}
{{- if not (kindIs "invalid" .Values.quotas.perOwner) }}
FLOWGATE_QUOTA_PER_OWNER: {{ .Values.quotas.perOwner | int | toString | quote }}
{{- end }}
{{- if not (kindIs "invalid" .Values.quotas.total) }}
FLOWGATE_QUOTA_TOTAL: {{ .Values.quotas.total | int | toString | quote }}
{{- end }}
{{- range $key, $env := dict "mlflowCpu" "FLOWGATE_MLFLOW_CPU" "mlflowMemory" "FLOWGATE_MLFLOW_MEMORY" "adapterCpu" "FLOWGATE_ADAPTER_CPU" "adapterMemory" "FLOWGATE_ADAPTER_MEMORY" "storeSize" "FLOWGATE_STORE_SIZE" }}
{{- with index $.Values.instances $key }}
{{ $env }}: {{ . | quote }}
{{- end }}
{{- end }}
{{- if ne .Values.accessKeys.secretName "flowgate-access-keys" }}
FLOWGATE_ACCESS_SECRET: {{ .Values.accessKeys.secretName | quote }}
{{- end }}
{{- with .Values.fetchCredentials.allow }}
FLOWGATE_ALLOW_CREDENTIALS: {{ join "," . | quote }}
{{- end }}
{{- with .Values.fetchCredentials.default }}
FLOWGATE_DEFAULT_CREDENTIALS: {{ . | quote }}
{{- end }}
RUST_LOG: {{ .Values.logLevel | quote }}
{{- range $k, $v := .Values.extraConfig }}
{{ $k }}: {{ $v | toString | quote }}
{{- end }}
{{- end -}}
